//! What `--config` may name, through the real binary: only a regular file (a symlink to one is
//! fine) of at most 64 MiB is read. A FIFO, a device (a symlink to /dev/zero), a directory or a
//! larger file is exit status 2 at start-up and in `--check-config`, promptly and naming the file
//! and what it is; on reload it is an ERROR that changes nothing, and the daemon keeps serving
//! and still stops on SIGTERM. A FIFO used to block an async worker in open() (with `-w 1`, the
//! whole daemon: new connections hung and SIGTERM was ignored), and /dev/zero was read until
//! memory ran out. Each case runs with one worker and with the default count.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, run_to_exit, Proxy};
use common::upstream::response_server;

const LISTEN: &str = "tcp:127.0.0.1:8001";
const WAIT: Duration = Duration::from_secs(10);
/// Far below the default drain timeout (30 s), far above what a stop takes.
const PROMPTLY: Duration = Duration::from_secs(5);
/// The `-w` values each case runs with: one worker (where a blocked worker blocked everything)
/// and the default.
const WORKERS: [Option<&str>; 2] = [Some("1"), None];

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a plain system call on a NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
}

/// Makes `path` a file of `len` bytes without writing them (sparse; reads as NUL bytes).
fn sparse_file(path: &Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

/// Removes whatever `path` is (file, FIFO, symlink or directory).
fn remove(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).unwrap(),
        Ok(_) => std::fs::remove_file(path).unwrap(),
        Err(_) => {}
    }
}

/// A thing `--config` must not be read as: what it is, how to make it at a path, and what the
/// error says.
type BadConfig = (&'static str, fn(&Path), &'static str);

fn bad_configs() -> Vec<BadConfig> {
    vec![
        (
            "a FIFO",
            |p| mkfifo(p),
            "is a FIFO (named pipe), not a regular file",
        ),
        (
            "a symlink to /dev/zero",
            |p| std::os::unix::fs::symlink("/dev/zero", p).unwrap(),
            "is a character device (/dev/zero through the symlink), not a regular file",
        ),
        (
            "a directory",
            |p| std::fs::create_dir(p).unwrap(),
            "is a directory, not a regular file",
        ),
        (
            "a file of 64 MiB + 1 byte",
            |p| sparse_file(p, 64 * 1024 * 1024 + 1),
            "is larger than 64 MiB",
        ),
    ]
}

fn args<'a>(config: &'a str, workers: Option<&'a str>, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![LISTEN, "192.0.2.10", "443", "--config", config];
    if let Some(n) = workers {
        args.extend(["-w", n]);
    }
    args.extend_from_slice(extra);
    args
}

#[test]
fn a_config_that_is_not_a_regular_file_or_too_large_exits_2_at_once_naming_it() {
    run_in_netns(|| async {
        for (what, make, says) in bad_configs() {
            for workers in WORKERS {
                for extra in [&[][..], &["--check-config"][..]] {
                    let dir = tempfile::tempdir().unwrap();
                    let path = dir.path().join("c.yaml");
                    make(&path);
                    let config = path.display().to_string();
                    let started = Instant::now();
                    let out = run_to_exit(&args(&config, workers, extra), Duration::from_secs(20));
                    let case = format!("{what}, -w {workers:?}, {extra:?}: stderr: {}", out.stderr);
                    assert!(
                        started.elapsed() < PROMPTLY,
                        "took {:?}: {case}",
                        started.elapsed()
                    );
                    assert_eq!(out.status.code(), Some(2), "{case}");
                    assert!(out.stderr.contains(&config), "names the file: {case}");
                    assert!(out.stderr.contains(says), "says {says:?}: {case}");
                    assert!(!out.stderr.contains("panicked"), "{case}");
                }
            }
        }
    });
}

#[test]
fn a_missing_config_says_what_it_always_said() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("c.yaml").display().to_string();
        let out = run_to_exit(&args(&config, None, &[]), Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
        assert!(
            out.stderr.contains(&format!(
                "cannot read configuration file {config}: No such file or directory"
            )),
            "{}",
            out.stderr
        );
    });
}

/// Sends a request through the proxy and expects the upstream's "A".
async fn assert_serves(proxy: &Proxy, when: &str) {
    let reply = connect(LISTEN).await.round_trip(b"who?", WAIT).await;
    assert_eq!(
        reply.as_deref().ok(),
        Some(&b"A"[..]),
        "{when}: {reply:?}\n{}",
        proxy.logs()
    );
}

/// Replaces `path` with what `make` makes, sends SIGHUP and waits for "reload failed" #`nth`;
/// returns that log line.
async fn reload_onto(proxy: &Proxy, path: &Path, make: fn(&Path), nth: usize) -> String {
    remove(path);
    make(path);
    proxy.signal(libc::SIGHUP);
    assert!(
        common::wait_until(WAIT, || proxy.logs().matches("reload failed").count()
            >= nth)
        .await,
        "no \"reload failed\" #{nth}:\n{}",
        proxy.logs()
    );
    proxy
        .logs()
        .lines()
        .filter(|l| l.contains("reload failed"))
        .nth(nth - 1)
        .unwrap()
        .to_owned()
}

#[test]
fn a_reload_onto_a_bad_config_is_an_error_the_daemon_keeps_serving_and_stops_on_sigterm() {
    run_in_netns(|| async {
        add_lo_addr("192.0.2.10".parse().unwrap());
        let upstream = response_server("192.0.2.10:443".parse().unwrap(), b"A".to_vec()).await;
        for workers in WORKERS {
            let dir = tempfile::tempdir().unwrap();
            let config = common::write_allowlist(&dir, common::UPSTREAM_ALLOWLIST);
            let path = PathBuf::from(&config);
            let mut proxy = Proxy::spawn(&args(&config, workers, &["--drain-timeout", "3s"]));
            proxy.wait_ready(LISTEN).await;
            assert_serves(&proxy, "before any reload").await;

            for (nth, (what, make, says)) in bad_configs().into_iter().enumerate() {
                let failure = reload_onto(&proxy, &path, make, nth + 1).await;
                let case = format!("-w {workers:?}, reload onto {what}: {failure}");
                assert!(failure.contains("ERROR"), "{case}");
                assert!(failure.contains(&config), "names the file: {case}");
                assert!(failure.contains(says), "says {says:?}: {case}");
                assert_serves(&proxy, &case).await;
            }
            assert!(!proxy.logs().contains("panicked"), "{}", proxy.logs());

            // A regular file again is applied again.
            remove(&path);
            proxy
                .reload_with(&path, common::UPSTREAM_ALLOWLIST, "allowlist reloaded", 1)
                .await;
            assert_serves(&proxy, "after a good reload").await;

            // And a FIFO left in place does not hold up the stop.
            remove(&path);
            mkfifo(&path);
            proxy.signal(libc::SIGHUP);
            proxy.signal(libc::SIGTERM);
            let status = proxy.wait_exit(PROMPTLY).await;
            assert_eq!(
                status.and_then(|s| s.code()),
                Some(0),
                "-w {workers:?}: SIGTERM: {status:?}\n{}",
                proxy.logs()
            );
        }
        assert_eq!(upstream.accepted(), 2 * 6);
    });
}

#[test]
fn a_symlink_to_a_regular_file_is_a_fine_config() {
    run_in_netns(|| async {
        add_lo_addr("192.0.2.10".parse().unwrap());
        let _upstream = response_server("192.0.2.10:443".parse().unwrap(), b"A".to_vec()).await;
        for workers in WORKERS {
            let dir = tempfile::tempdir().unwrap();
            let target = common::write_allowlist(&dir, common::UPSTREAM_ALLOWLIST);
            let link = dir.path().join("c.yaml");
            std::os::unix::fs::symlink(&target, &link).unwrap();
            let config = link.display().to_string();

            let out = run_to_exit(&args(&config, workers, &["--check-config"]), WAIT);
            assert_eq!(out.status.code(), Some(0), "{}", out.stderr);

            let mut proxy = Proxy::spawn(&args(&config, workers, &["--drain-timeout", "3s"]));
            proxy.wait_ready(LISTEN).await;
            assert_serves(&proxy, "through a symlinked config").await;
            // Reloaded through the symlink too.
            proxy
                .reload_with(&link, common::UPSTREAM_ALLOWLIST, "allowlist reloaded", 1)
                .await;
            assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
            assert_serves(&proxy, "after a reload through the symlink").await;
            proxy.signal(libc::SIGTERM);
            let status = proxy.wait_exit(PROMPTLY).await;
            assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", proxy.logs());
        }
    });
}

/// An allowlist the size of a large published prefix list loads, and every entry keeps its line:
/// the check of a route allowed by the very last CIDR entry names that entry's index and line.
/// (How long it takes is `make bench`'s figure, not asserted here.)
#[test]
fn check_config_on_100000_cidrs_and_10000_names_finishes_and_names_the_last_entrys_line() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("large.yaml");
        let mut text = String::from("allowlist:\n");
        for i in 0..10_000 {
            text.push_str(&format!(
                "  - {{address: name{i}.example.com, port: 443}}\n"
            ));
        }
        for i in 0..100_000u32 {
            let [w, x, y, z] = (0x0a00_0000 + (i << 8)).to_be_bytes();
            text.push_str(&format!("  - {{address: {w}.{x}.{y}.{z}/24, port: 443}}\n"));
        }
        std::fs::write(&path, text).unwrap();
        let config = path.display().to_string();
        // The last block, 11.134.159.0/24, is entry 10,000 + 99,999 = 109,999, on line 110,001.
        let remote = "11.134.159.7";
        let out = run_to_exit(
            &[LISTEN, remote, "443", "--config", &config, "--check-config"],
            Duration::from_secs(300),
        );
        assert_eq!(out.status.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("configuration OK"), "{}", out.stdout);
        let entry = "11.134.159.0/24:443 (allowlist[109999], line 110001)";
        assert!(out.stdout.contains(entry), "names {entry}: {}", out.stdout);
    });
}
