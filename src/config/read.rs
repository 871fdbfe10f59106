//! Reading the configuration file's text without trusting what `--config` names.
//!
//! The daemon runs as root and re-reads the file on every SIGHUP, so the path may name anything
//! by then: a FIFO with no writer blocks a plain `open()` forever (even on a blocking thread, the
//! thread is lost), a device such as `/dev/zero` is read until memory runs out. So only a regular
//! file is read (a symlink to one is fine), it is opened without blocking, and at most
//! [`MAX_FILE_SIZE`] bytes are read. Errors are [`ConfigError::Read`]: "cannot read
//! configuration file PATH: " and what the file is and how to fix it; errors of the OS (a missing
//! file, no permission) read exactly as they did before these checks.

use std::fs::{File, FileType, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::config::error::ConfigError;

/// The most a configuration file may hold. Real allowlists are a few KiB; the cap only keeps a
/// wrong path (or a file being appended to forever) from exhausting memory.
pub const MAX_FILE_SIZE: u64 = 64 * 1024 * 1024;

/// [`MAX_FILE_SIZE`] as operators read it in messages.
const MAX_FILE_SIZE_SHOWN: &str = "64 MiB";

/// The text of the configuration file at `path`, if it is a regular file (or a symlink to one)
/// of at most [`MAX_FILE_SIZE`] bytes of UTF-8. Blocking, but never on the file's type: a FIFO,
/// a device, a directory or a socket is refused before it is opened.
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    let error = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    // metadata() follows symlinks, so a symlink to a regular file passes and one to /dev/zero
    // does not. Checked before open(): opening a FIFO for reading waits for a writer.
    let metadata = std::fs::metadata(path).map_err(error)?;
    refuse_unless_regular(path, metadata.file_type())?;
    // O_NONBLOCK: the path may have been swapped for a FIFO since the stat above, and a
    // non-blocking open of a FIFO returns at once. On a regular file it changes nothing.
    // O_NOCTTY: nor may a swapped-in terminal become the daemon's controlling terminal.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(error)?;
    check_opened(path, &file)?;
    let mut text = String::new();
    // One byte more than the cap tells "exactly the cap" from "more": the size fstat reported
    // can be stale (a file still being written) or 0 (files under /proc).
    file.take(MAX_FILE_SIZE + 1)
        .read_to_string(&mut text)
        .map_err(error)?;
    if text.len() as u64 > MAX_FILE_SIZE {
        return Err(too_large(path, None));
    }
    Ok(text)
}

/// Checks the opened file itself: what was stat'ed by path may have been replaced before the
/// open, and the descriptor is what will be read.
fn check_opened(path: &Path, file: &File) -> Result<(), ConfigError> {
    let metadata = file.metadata().map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    refuse_unless_regular(path, metadata.file_type())?;
    // Refused before reading anything, rather than after reading the first 64 MiB.
    if metadata.len() > MAX_FILE_SIZE {
        return Err(too_large(path, Some(metadata.len())));
    }
    Ok(())
}

fn refuse_unless_regular(path: &Path, file_type: FileType) -> Result<(), ConfigError> {
    if file_type.is_file() {
        return Ok(());
    }
    let what = describe(file_type);
    // Through a symlink, name what it leads to: `c.yaml` alone would not say why it is a device.
    let target = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(path)
            .map(|t| format!(" ({} through the symlink)", t.display()))
            .unwrap_or_default(),
        _ => String::new(),
    };
    Err(ConfigError::Read {
        path: path.to_owned(),
        source: io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "it is {what}{target}, not a regular file; point --config at a regular file \
                 (a symlink to one is fine)"
            ),
        ),
    })
}

/// What a file that is not a regular file is, for messages.
fn describe(file_type: FileType) -> &'static str {
    if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "of an unknown type"
    }
}

/// `size`: what fstat said, when it is what gave it away.
fn too_large(path: &Path, size: Option<u64>) -> ConfigError {
    let size = size.map_or_else(String::new, |s| format!(" ({s} bytes)"));
    ConfigError::Read {
        path: path.to_owned(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "it is larger than {MAX_FILE_SIZE_SHOWN}{size}, the most a configuration file \
                 may hold; check that --config names the allowlist file"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a plain system call on a NUL-terminated path.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo: {}", io::Error::last_os_error());
    }

    fn message(result: Result<String, ConfigError>) -> String {
        match result {
            Ok(text) => panic!("expected an error, read {} bytes", text.len()),
            Err(e) => e.to_string(),
        }
    }

    fn symlink(target: &Path, dir: &Path) -> PathBuf {
        let link = dir.join("link.yaml");
        std::os::unix::fs::symlink(target, &link).unwrap();
        link
    }

    const YAML: &str = "allowlist:\n- {address: 192.0.2.10, port: 443}\n";

    #[test]
    fn reads_a_regular_file_and_a_symlink_to_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, YAML).unwrap();
        assert_eq!(read_text(&path).unwrap(), YAML);
        let link = symlink(&path, dir.path());
        assert_eq!(read_text(&link).unwrap(), YAML);
    }

    #[test]
    fn a_missing_file_reads_as_it_always_did() {
        let path = Path::new("/nonexistent/c.yaml");
        assert_eq!(
            message(read_text(path)),
            "cannot read configuration file /nonexistent/c.yaml: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        mkfifo(&path);
        // If this blocked in open() the test would hang, which is the bug being tested.
        let m = message(read_text(&path));
        assert!(m.contains(&path.display().to_string()), "{m}");
        assert!(
            m.contains("is a FIFO (named pipe), not a regular file"),
            "{m}"
        );
        let link = symlink(&path, dir.path());
        let m = message(read_text(&link));
        assert!(m.contains("is a FIFO (named pipe)"), "{m}");
        assert!(m.contains("through the symlink"), "{m}");
    }

    #[test]
    fn a_fifo_swapped_in_after_the_stat_is_refused_by_the_opened_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        mkfifo(&path);
        // What read_text opens after its stat: a non-blocking open returns at once.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let m = check_opened(&path, &file).unwrap_err().to_string();
        assert!(m.contains("is a FIFO (named pipe)"), "{m}");
    }

    #[test]
    fn devices_directories_and_sockets_are_refused_by_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let zero = symlink(Path::new("/dev/zero"), dir.path());
        let m = message(read_text(&zero));
        assert!(
            m.contains("is a character device (/dev/zero through the symlink), not a regular file"),
            "{m}"
        );
        let m = message(read_text(dir.path()));
        assert!(m.contains("is a directory, not a regular file"), "{m}");
        let socket = dir.path().join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let m = message(read_text(&socket));
        assert!(m.contains("is a socket, not a regular file"), "{m}");
    }

    #[test]
    fn more_than_64_mib_is_refused_exactly_64_mib_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        // Sparse: no disk space used, reads as NUL bytes (valid UTF-8).
        let file = File::create(&path).unwrap();
        file.set_len(MAX_FILE_SIZE + 1).unwrap();
        let m = message(read_text(&path));
        assert!(m.contains(&path.display().to_string()), "{m}");
        assert!(m.contains("is larger than 64 MiB (67108865 bytes)"), "{m}");
        file.set_len(MAX_FILE_SIZE).unwrap();
        assert_eq!(read_text(&path).unwrap().len() as u64, MAX_FILE_SIZE);
    }

    #[test]
    fn a_file_that_reports_size_0_is_read_whole() {
        // Files under /proc report size 0: the cap comes from take(), not from fstat's size.
        let text = read_text(Path::new("/proc/self/maps")).unwrap();
        assert!(!text.is_empty());
    }
}
