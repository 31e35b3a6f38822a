//! Files in the target's root directory: the confined path resolution every file
//! operation goes through ([`TargetRoot`]), and the session's table of open files
//! ([`Files`]), which answers the file requests of [`RemoteRequest`].
//!
//! Every path is resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`
//! relative to the descriptor of `/proc/PID/root`: `..` stops at the target's root
//! and absolute symlinks are resolved inside it, so no path a client sends can
//! reach a file outside the target's filesystem. Operations on a name (mkdir,
//! unlink, rename) resolve the parent that way and then act on the last component
//! alone, which cannot escape.
//!
//! All functions here block; the session runs them on tokio's blocking pool.

mod root;

pub use self::root::TargetRoot;
use self::root::retry_intr;

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use graft_protocol::codec::MAX_CHUNK_LEN;
use graft_protocol::remote::{
    DirEntry, FileHandle, FileStat, OpenFlags, RemoteError, RemoteRequest, RemoteResponse,
    RootIdentity,
};
use rustix::fs::{Access, AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

/// The most files one session may hold open at once.
pub const MAX_OPEN_FILES: usize = 4096;

/// Converts the protocol's open flags to `open(2)` flags.
pub fn open_flags(flags: &OpenFlags) -> OFlags {
    let mut out = match (flags.read, flags.write || flags.append) {
        (true, true) => OFlags::RDWR,
        (false, true) => OFlags::WRONLY,
        _ => OFlags::RDONLY,
    };
    for (set, flag) in [
        (flags.create, OFlags::CREATE),
        (flags.exclusive, OFlags::EXCL),
        (flags.truncate, OFlags::TRUNC),
        (flags.append, OFlags::APPEND),
        (flags.directory, OFlags::DIRECTORY),
        (flags.no_follow, OFlags::NOFOLLOW),
    ] {
        if set {
            out |= flag;
        }
    }
    out
}

/// Converts a kernel `stat` to the protocol's [`FileStat`].
pub fn file_stat(st: &Stat) -> FileStat {
    graft_protocol::file_stat_of!(st)
}

/// `d_type` of a file type, as `readdir(3)` reports it.
fn d_type(kind: FileType) -> u8 {
    match kind {
        FileType::Unknown => 0,
        other => (other.as_raw_mode() >> 12) as u8,
    }
}

/// The files a session holds open, and the answers to its file requests.
#[derive(Debug)]
pub struct Files {
    root: std::sync::Arc<TargetRoot>,
    handles: Mutex<HashMap<FileHandle, std::sync::Arc<OwnedFd>>>,
    next_handle: AtomicU64,
}

type Outcome = Result<RemoteResponse, Errno>;

impl Files {
    /// Opens the regular file `path` confined to the target's root, for a link
    /// that passes the descriptor itself ([`RemoteRequest::OpenFd`]). Nothing but a
    /// regular file is handed out: a directory descriptor would let the program
    /// walk with `openat` where no rule sends it, and a device's would take
    /// `ioctl`s the relayed path never forwards (blocking).
    ///
    /// # Errors
    ///
    /// [`RemoteError::Os`] with the open's errno; [`RemoteError::Unsupported`] for
    /// anything but a regular file (the caller falls back to [`RemoteRequest::Open`]).
    pub fn open_fd(
        &self,
        path: &str,
        flags: &OpenFlags,
        mode: u32,
    ) -> Result<(OwnedFd, FileStat), RemoteError> {
        let not_regular = || RemoteError::Unsupported("not a regular file".into());
        if flags.directory {
            return Err(not_regular());
        }
        let os = |e: Errno| RemoteError::Os(e.raw_os_error());
        let fd = self
            .root
            .open(path, open_flags(flags), Mode::from_bits_truncate(mode))
            .map_err(os)?;
        let stat = rustix::fs::fstat(&fd).map_err(os)?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(not_regular());
        }
        Ok((fd, file_stat(&stat)))
    }

    /// The identity of the target's root ([`TargetRoot::identity`]).
    ///
    /// # Errors
    ///
    /// [`RemoteError::Os`] with the errno of `statx(2)`.
    pub fn root_identity(&self, pid: u32) -> Result<RootIdentity, RemoteError> {
        self.root
            .identity(pid)
            .map_err(|e| RemoteError::Os(e.raw_os_error()))
    }

    /// A session's file table over the target's root.
    pub fn new(root: std::sync::Arc<TargetRoot>) -> Files {
        Files {
            root,
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
        }
    }

    /// Answers one file request (blocking). Requests that are not about files are
    /// answered with [`RemoteError::Unsupported`].
    pub fn handle(&self, request: RemoteRequest) -> RemoteResponse {
        let outcome = match request {
            RemoteRequest::Open { path, flags, mode } => self.open(&path, &flags, mode),
            RemoteRequest::Read {
                handle,
                offset,
                len,
            } => self.read(handle, offset, len),
            RemoteRequest::Write {
                handle,
                offset,
                data,
            } => self.write(handle, offset, &data),
            RemoteRequest::Truncate { handle, len } => self
                .fd(handle)
                .and_then(|fd| rustix::fs::ftruncate(&*fd, len))
                .map(|()| RemoteResponse::Done),
            RemoteRequest::Close { handle } => self.close(handle),
            RemoteRequest::Stat { path, follow } => self
                .root
                .stat(&path, follow)
                .map(|st| RemoteResponse::Stat(file_stat(&st))),
            RemoteRequest::ReadDir { path } => self.read_dir(&path),
            RemoteRequest::Access { path, mode } => self.access(&path, mode),
            RemoteRequest::MkDir { path, mode } => self.root.parent_of(&path).and_then(|(d, n)| {
                rustix::fs::mkdirat(&d, n.as_str(), Mode::from_bits_truncate(mode))
                    .map(|()| RemoteResponse::Done)
            }),
            RemoteRequest::Remove { path, dir } => {
                let flags = if dir {
                    AtFlags::REMOVEDIR
                } else {
                    AtFlags::empty()
                };
                self.root.parent_of(&path).and_then(|(d, n)| {
                    rustix::fs::unlinkat(&d, n.as_str(), flags).map(|()| RemoteResponse::Done)
                })
            }
            RemoteRequest::Rename { from, to } => {
                self.root.parent_of(&from).and_then(|(fd, fname)| {
                    let (td, tname) = self.root.parent_of(&to)?;
                    rustix::fs::renameat(&fd, fname.as_str(), &td, tname.as_str())
                        .map(|()| RemoteResponse::Done)
                })
            }
            RemoteRequest::ReadLink { path } => self.read_link(&path),
            RemoteRequest::ReadFile { path, no_follow } => self.read_file(&path, no_follow),
            other => {
                return RemoteResponse::Error(RemoteError::Unsupported(format!(
                    "{other:?} is not a file request"
                )));
            }
        };
        outcome.unwrap_or_else(|errno| RemoteResponse::Error(RemoteError::Os(errno.raw_os_error())))
    }

    /// How many files are open.
    pub fn open_count(&self) -> usize {
        self.handles.lock().expect("file table lock poisoned").len()
    }

    fn fd(&self, handle: FileHandle) -> Result<std::sync::Arc<OwnedFd>, Errno> {
        self.handles
            .lock()
            .expect("file table lock poisoned")
            .get(&handle)
            .cloned()
            .ok_or(Errno::BADF)
    }

    fn open(&self, path: &str, flags: &OpenFlags, mode: u32) -> Outcome {
        if self.open_count() >= MAX_OPEN_FILES {
            return Err(Errno::MFILE);
        }
        let fd = self
            .root
            .open(path, open_flags(flags), Mode::from_bits_truncate(mode))?;
        let stat = file_stat(&rustix::fs::fstat(&fd)?);
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .expect("file table lock poisoned")
            .insert(handle, std::sync::Arc::new(fd));
        Ok(RemoteResponse::Opened { handle, stat })
    }

    /// Opens read-only, answers the metadata and the first chunk; keeps the file
    /// open (a handle in the answer) only when there is more to read.
    fn read_file(&self, path: &str, no_follow: bool) -> Outcome {
        let flags = OpenFlags {
            no_follow,
            ..OpenFlags::READ
        };
        let RemoteResponse::Opened { handle, stat } = self.open(path, &flags, 0)? else {
            unreachable!("open answers Opened or fails");
        };
        if stat.is_dir() {
            self.close(handle)?;
            return Ok(RemoteResponse::File {
                stat,
                data: Vec::new(),
                rest: None,
            });
        }
        let data = match self.read(handle, 0, MAX_CHUNK_LEN as u32) {
            Ok(RemoteResponse::Data(data)) => data,
            Ok(_) => unreachable!("read answers Data or fails"),
            Err(e) => {
                let _ = self.close(handle);
                return Err(e);
            }
        };
        let rest = if data.len() < MAX_CHUNK_LEN {
            self.close(handle)?;
            None
        } else {
            Some(handle)
        };
        Ok(RemoteResponse::File { stat, data, rest })
    }

    fn read(&self, handle: FileHandle, offset: u64, len: u32) -> Outcome {
        let fd = self.fd(handle)?;
        let len = (len as usize).min(MAX_CHUNK_LEN);
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        // Short only at end of file, as the protocol promises.
        while filled < len {
            let n = retry_intr(|| {
                rustix::io::pread(fd.as_fd(), &mut buf[filled..], offset + filled as u64)
            })?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        Ok(RemoteResponse::Data(buf))
    }

    fn write(&self, handle: FileHandle, offset: u64, data: &[u8]) -> Outcome {
        let fd = self.fd(handle)?;
        let mut written = 0;
        while written < data.len() {
            let n = retry_intr(|| {
                rustix::io::pwrite(fd.as_fd(), &data[written..], offset + written as u64)
            })?;
            if n == 0 {
                return Err(Errno::IO);
            }
            written += n;
        }
        Ok(RemoteResponse::Written(written as u64))
    }

    fn close(&self, handle: FileHandle) -> Outcome {
        self.handles
            .lock()
            .expect("file table lock poisoned")
            .remove(&handle)
            .map(|_| RemoteResponse::Done)
            .ok_or(Errno::BADF)
    }

    fn read_dir(&self, path: &str) -> Outcome {
        let fd = self
            .root
            .open(path, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
        let mut entries = Vec::new();
        for entry in rustix::fs::Dir::new(fd)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            entries.push(DirEntry {
                name: String::from_utf8_lossy(name).into_owned(),
                ino: entry.ino(),
                kind: d_type(entry.file_type()),
            });
        }
        Ok(RemoteResponse::Dir(entries))
    }

    fn access(&self, path: &str, mode: i32) -> Outcome {
        let fd = self.root.open(path, OFlags::PATH, Mode::empty())?;
        let access = Access::from_bits_retain(mode as u32);
        match rustix::fs::accessat(&fd, "", access, AtFlags::EMPTY_PATH) {
            Ok(()) => Ok(RemoteResponse::Done),
            // Kernels before 5.8 have no faccessat2: judge as root would be judged.
            Err(Errno::NOSYS) | Err(Errno::INVAL) => {
                let st = rustix::fs::fstat(&fd)?;
                let wants_exec = access.contains(Access::EXEC_OK);
                let is_dir = st.st_mode & 0o170000 == 0o040000;
                if wants_exec && !is_dir && st.st_mode & 0o111 == 0 {
                    Err(Errno::ACCESS)
                } else {
                    Ok(RemoteResponse::Done)
                }
            }
            Err(e) => Err(e),
        }
    }

    fn read_link(&self, path: &str) -> Outcome {
        let fd = self
            .root
            .open(path, OFlags::PATH | OFlags::NOFOLLOW, Mode::empty())?;
        let st = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
            return Err(Errno::INVAL);
        }
        let target = rustix::fs::readlinkat(&fd, "", Vec::new())?;
        Ok(RemoteResponse::Link(
            String::from_utf8_lossy(target.as_bytes()).into_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A fake target root: `root/etc/passwd` says "inside", the real root's does not.
    fn fake_root() -> (tempfile::TempDir, Files) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("etc/passwd"), "inside\n").unwrap();
        std::fs::write(tmp.path().join("outside"), "outside\n").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("abs-link")).unwrap();
        std::os::unix::fs::symlink("../../../outside", root.join("a/b/rel-link")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root/etc/passwd", root.join("magic")).unwrap();
        let dir = rustix::fs::open(
            &root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        (tmp, Files::new(Arc::new(TargetRoot::new(dir))))
    }

    #[test]
    fn read_file_answers_small_files_whole_in_one_round_trip() {
        let (_tmp, files) = fake_root();
        let answer = files.handle(RemoteRequest::ReadFile {
            path: "/a/b/../../etc/passwd".into(),
            no_follow: false,
        });
        let RemoteResponse::File { stat, data, rest } = answer else {
            panic!("expected File, got {answer:?}");
        };
        assert_eq!(data, b"inside\n");
        assert_eq!(stat.size, 7);
        assert_eq!(rest, None);
        assert_eq!(files.open_count(), 0, "a small file is not kept open");
    }

    #[test]
    fn read_file_keeps_a_handle_for_the_rest_of_a_large_file() {
        let (tmp, files) = fake_root();
        let big = vec![b'x'; MAX_CHUNK_LEN + 10];
        std::fs::write(tmp.path().join("root/big"), &big).unwrap();
        let answer = files.handle(RemoteRequest::ReadFile {
            path: "/big".into(),
            no_follow: false,
        });
        let RemoteResponse::File {
            data,
            rest: Some(handle),
            ..
        } = answer
        else {
            panic!("expected File with a handle, got {answer:?}");
        };
        assert_eq!(data.len(), MAX_CHUNK_LEN);
        let tail = files.handle(RemoteRequest::Read {
            handle,
            offset: data.len() as u64,
            len: 100,
        });
        assert_eq!(tail, RemoteResponse::Data(vec![b'x'; 10]));
        assert_eq!(
            files.handle(RemoteRequest::Close { handle }),
            RemoteResponse::Done
        );
    }

    #[test]
    fn read_file_of_a_directory_is_metadata_only_and_symlinks_stay_inside() {
        let (_tmp, files) = fake_root();
        let answer = files.handle(RemoteRequest::ReadFile {
            path: "/a".into(),
            no_follow: false,
        });
        assert!(
            matches!(&answer, RemoteResponse::File { stat, data, rest: None } if stat.is_dir() && data.is_empty()),
            "{answer:?}"
        );
        let answer = files.handle(RemoteRequest::ReadFile {
            path: "/a/b/rel-link".into(),
            no_follow: false,
        });
        assert!(
            !matches!(&answer, RemoteResponse::File { data, .. } if data == b"outside\n"),
            "escaped the root: {answer:?}"
        );
        let answer = files.handle(RemoteRequest::ReadFile {
            path: "/abs-link".into(),
            no_follow: true,
        });
        assert_eq!(answer, RemoteResponse::Error(RemoteError::Os(libc::ELOOP)));
        assert_eq!(files.open_count(), 0);
    }

    /// The file's text, or the response that was not what reading needs.
    fn read_all(files: &Files, path: &str) -> Result<String, Box<RemoteResponse>> {
        let handle = match files.handle(RemoteRequest::Open {
            path: path.into(),
            flags: OpenFlags::READ,
            mode: 0,
        }) {
            RemoteResponse::Opened { handle, .. } => handle,
            other => return Err(Box::new(other)),
        };
        let data = match files.handle(RemoteRequest::Read {
            handle,
            offset: 0,
            len: 1 << 20,
        }) {
            RemoteResponse::Data(d) => d,
            other => return Err(Box::new(other)),
        };
        assert_eq!(
            files.handle(RemoteRequest::Close { handle }),
            RemoteResponse::Done
        );
        Ok(String::from_utf8(data).unwrap())
    }

    #[test]
    fn dot_dot_cannot_leave_the_root() {
        let (_tmp, files) = fake_root();
        assert_eq!(read_all(&files, "/../../etc/passwd").unwrap(), "inside\n");
        assert_eq!(
            read_all(&files, "a/b/../../../../etc/passwd").unwrap(),
            "inside\n"
        );
    }

    #[test]
    fn absolute_symlinks_resolve_inside_the_root() {
        let (_tmp, files) = fake_root();
        assert_eq!(read_all(&files, "/abs-link").unwrap(), "inside\n");
    }

    #[test]
    fn relative_symlinks_cannot_climb_out() {
        let (_tmp, files) = fake_root();
        // ../../../outside from /a/b stops at the root: /outside does not exist there.
        assert_eq!(
            *read_all(&files, "/a/b/rel-link").unwrap_err(),
            RemoteResponse::Error(RemoteError::Os(libc::ENOENT))
        );
    }

    #[test]
    fn magic_links_are_refused() {
        let (_tmp, files) = fake_root();
        // /proc does not exist in the fake root, so this cannot even reach a magic link;
        // what matters is that it is not the host's passwd.
        assert!(read_all(&files, "/magic").is_err());
    }

    #[test]
    fn stat_lstat_readlink_readdir() {
        let (_tmp, files) = fake_root();
        let RemoteResponse::Stat(st) = files.handle(RemoteRequest::Stat {
            path: "/abs-link".into(),
            follow: true,
        }) else {
            panic!("stat failed")
        };
        assert_eq!(st.size, 7);
        let RemoteResponse::Stat(lst) = files.handle(RemoteRequest::Stat {
            path: "/abs-link".into(),
            follow: false,
        }) else {
            panic!("lstat failed")
        };
        assert_eq!(lst.mode & 0o170000, 0o120000);
        assert_eq!(
            files.handle(RemoteRequest::ReadLink {
                path: "/abs-link".into()
            }),
            RemoteResponse::Link("/etc/passwd".into())
        );
        assert_eq!(
            files.handle(RemoteRequest::ReadLink {
                path: "/etc/passwd".into()
            }),
            RemoteResponse::Error(RemoteError::Os(libc::EINVAL))
        );
        let RemoteResponse::Dir(mut entries) =
            files.handle(RemoteRequest::ReadDir { path: "/".into() })
        else {
            panic!("readdir failed")
        };
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "abs-link", "etc", "magic"]);
        assert_eq!(entries[0].kind, libc::DT_DIR);
        assert_eq!(entries[1].kind, libc::DT_LNK);
    }

    #[test]
    fn write_operations_stay_inside() {
        let (tmp, files) = fake_root();
        let root = tmp.path().join("root");
        assert_eq!(
            files.handle(RemoteRequest::MkDir {
                path: "/../new".into(),
                mode: 0o755
            }),
            RemoteResponse::Done
        );
        assert!(root.join("new").is_dir());
        assert!(!tmp.path().join("new").exists());
        let RemoteResponse::Opened { handle, .. } = files.handle(RemoteRequest::Open {
            path: "/new/f".into(),
            flags: OpenFlags {
                write: true,
                create: true,
                ..OpenFlags::default()
            },
            mode: 0o644,
        }) else {
            panic!("create failed")
        };
        assert_eq!(
            files.handle(RemoteRequest::Write {
                handle,
                offset: 0,
                data: b"hello".to_vec()
            }),
            RemoteResponse::Written(5)
        );
        assert_eq!(
            files.handle(RemoteRequest::Truncate { handle, len: 4 }),
            RemoteResponse::Done
        );
        files.handle(RemoteRequest::Close { handle });
        assert_eq!(std::fs::read(root.join("new/f")).unwrap(), b"hell");
        assert_eq!(
            files.handle(RemoteRequest::Rename {
                from: "/new/f".into(),
                to: "/abs-link/../g".into()
            }),
            // /abs-link is a symlink to a file: not a directory.
            RemoteResponse::Error(RemoteError::Os(libc::ENOTDIR))
        );
        assert_eq!(
            files.handle(RemoteRequest::Rename {
                from: "/new/f".into(),
                to: "/g".into()
            }),
            RemoteResponse::Done
        );
        assert_eq!(std::fs::read(root.join("g")).unwrap(), b"hell");
        assert_eq!(
            files.handle(RemoteRequest::Remove {
                path: "/g".into(),
                dir: false
            }),
            RemoteResponse::Done
        );
        assert_eq!(
            files.handle(RemoteRequest::Remove {
                path: "/new/".into(),
                dir: true
            }),
            RemoteResponse::Done
        );
        assert!(!root.join("new").exists());
        assert_eq!(
            files.handle(RemoteRequest::Remove {
                path: "/".into(),
                dir: true
            }),
            RemoteResponse::Error(RemoteError::Os(libc::EBUSY))
        );
    }

    #[test]
    fn access_and_bad_handles() {
        let (_tmp, files) = fake_root();
        assert_eq!(
            files.handle(RemoteRequest::Access {
                path: "/etc/passwd".into(),
                mode: libc::R_OK
            }),
            RemoteResponse::Done
        );
        assert_eq!(
            files.handle(RemoteRequest::Access {
                path: "/nope".into(),
                mode: libc::F_OK
            }),
            RemoteResponse::Error(RemoteError::Os(libc::ENOENT))
        );
        assert_eq!(
            files.handle(RemoteRequest::Read {
                handle: 99,
                offset: 0,
                len: 1
            }),
            RemoteResponse::Error(RemoteError::Os(libc::EBADF))
        );
    }

    #[test]
    fn open_flags_map_to_open2_flags() {
        assert_eq!(open_flags(&OpenFlags::READ), OFlags::RDONLY);
        let rw = OpenFlags {
            read: true,
            write: true,
            create: true,
            truncate: true,
            ..OpenFlags::default()
        };
        assert_eq!(
            open_flags(&rw),
            OFlags::RDWR | OFlags::CREATE | OFlags::TRUNC
        );
    }
}
