//! An "enclave" on a host: a network namespace with only `lo`, beside the test's own namespace
//! (the "parent"), as `/work/shared/notes/enclave-netns-recipe.md` measured it.
//!
//! Owns:
//! * [`Enclave`]: a thread that leaves the test's namespaces for new network and mount
//!   namespaces (so its `/etc/resolv.conf` can be its own, bind-mounted, and vanishes with it),
//!   brings `lo` up, and then runs jobs: whatever it starts (`enclave-app egress`, `nft`, `ip`,
//!   curl, python3, openssl) and whatever sockets it opens live in the enclave. Both namespaces
//!   share the file system, so `unix:` stand-ins in a temporary directory join them, and no TCP
//!   of that channel can meet the enclave's redirect;
//! * [`TlsUpstream`]: a rustls server signed by a throwaway CA (written as PEM for the clients'
//!   `--cacert`), answering `hello <server name>` and recording the server names it saw.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

type Job = Box<dyn FnOnce() + Send>;

/// The enclave's thread; its namespaces go when it ends (when this is dropped).
pub struct Enclave {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Enclave {
    /// Starts the thread: new network and mount namespaces, `lo` up, `resolv` bind-mounted over
    /// `/etc/resolv.conf`.
    ///
    /// # Panics
    /// If a namespace or the mount cannot be made (not root).
    pub fn start(resolv: &Path) -> Enclave {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel::<Result<(), String>>();
        let resolv = resolv.to_path_buf();
        let thread = std::thread::spawn(move || {
            let entered = enter(&resolv);
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if ok {
                for job in queue {
                    job();
                }
            }
        });
        ready
            .recv()
            .expect("the enclave thread ended before it was ready")
            .unwrap_or_else(|e| panic!("cannot make the enclave: {e}"));
        Enclave {
            jobs: Some(jobs),
            thread: Some(thread),
        }
    }

    /// Runs `f` on the enclave's thread and returns what it returns.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .as_ref()
            .expect("the enclave is running")
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .expect("the enclave thread has ended (a job panicked?)");
        rx.await
            .expect("an enclave job panicked; see its message above")
    }

    /// Runs `program args...` in the enclave to completion, killed after `timeout` (with
    /// coreutils' `timeout`, so a hanging client fails the test rather than hanging it).
    pub async fn output(&self, program: &str, args: &[&str], timeout: Duration) -> Output {
        self.output_with_input(program, args, None, timeout).await
    }

    /// As [`Enclave::output`], with `input` on standard input.
    pub async fn output_with_input(
        &self,
        program: &str,
        args: &[&str],
        input: Option<&[u8]>,
        timeout: Duration,
    ) -> Output {
        let secs = timeout.as_secs().max(1).to_string();
        let mut all = vec![secs, program.to_owned()];
        all.extend(args.iter().map(|a| a.to_string()));
        let input = input.map(<[u8]>::to_vec);
        self.run(move || {
            use std::io::Write;
            use std::process::Stdio;
            let mut child = Command::new("timeout")
                .args(&all)
                .env("NO_COLOR", "1")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {all:?} in the enclave: {e}"));
            if let Some(mut stdin) = child.stdin.take() {
                if let Some(input) = input {
                    let _ = stdin.write_all(&input);
                }
            }
            child
                .wait_with_output()
                .unwrap_or_else(|e| panic!("cannot wait for {all:?}: {e}"))
        })
        .await
    }

    /// Runs `program args...` in the enclave and panics with its output unless it succeeds.
    pub async fn must(&self, program: &str, args: &[&str]) -> String {
        let out = self.output(program, args, Duration::from_secs(30)).await;
        assert!(
            out.status.success(),
            "`{program} {}` failed in the enclave ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls `check` (run in the enclave) until it holds; whether it did within `timeout`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        check: impl Fn() -> bool + Send + Sync + Clone + 'static,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.run(check.clone()).await {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Enclave {
    fn drop(&mut self) {
        // Closing the queue ends the thread, and its namespaces with it.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Moves the calling thread into new network and mount namespaces, brings `lo` up and
/// bind-mounts `resolv` over `/etc/resolv.conf` (privately: nothing of it reaches the host).
fn enter(resolv: &Path) -> Result<(), String> {
    use std::ffi::CString;
    let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: unshare changes only this thread's namespaces (CLONE_NEWNS implies CLONE_FS,
    // which a thread may unshare alone).
    if unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) } != 0 {
        return Err(os("unshare(CLONE_NEWNET | CLONE_NEWNS) (run as root)"));
    }
    let root = CString::new("/").map_err(|e| e.to_string())?;
    let target = CString::new("/etc/resolv.conf").map_err(|e| e.to_string())?;
    let source = CString::new(resolv.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: mount(2) with NUL-terminated strings that outlive the calls.
    unsafe {
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(os("making / private in the enclave's mount namespace"));
        }
        if libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            return Err(os("bind-mounting the enclave's resolv.conf"));
        }
    }
    let out = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip link set lo up: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// A TLS upstream signed by a throwaway CA; stops when dropped.
pub struct TlsUpstream {
    pub ca_pem: PathBuf,
    names_seen: Arc<Mutex<Vec<String>>>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsUpstream {
    /// Serves on `addr` with a certificate for `names` (wildcards allowed), writing the CA to
    /// `ca_pem`.
    pub async fn start(addr: SocketAddr, names: &[&str], ca_pem: PathBuf) -> TlsUpstream {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "egress test CA (throwaway)");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), ca.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("cannot bind the TLS upstream on {addr}: {e}"));
        let names_seen = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (seen, count) = (names_seen.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let (acceptor, seen) = (acceptor.clone(), seen.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let name = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
                    seen.lock().unwrap().push(name.clone());
                    let mut request = Vec::new();
                    let mut byte = [0u8; 1];
                    while !request.ends_with(b"\r\n\r\n") && request.len() < 8192 {
                        match tls.read(&mut byte).await {
                            Ok(1) => request.push(byte[0]),
                            _ => break,
                        }
                    }
                    let body = format!("hello {name}\n");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        TlsUpstream {
            ca_pem,
            names_seen,
            accepted,
            task,
        }
    }

    /// The server names of the handshakes completed so far.
    pub fn names_seen(&self) -> Vec<String> {
        self.names_seen.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
