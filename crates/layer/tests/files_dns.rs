//! The file and name-resolution hooks under real programs (cat, ls, sh, getent,
//! Python, a compiled C program), against a fake proxy that serves a temporary
//! directory as the target's root and resolves `only-remote.test`.

#![allow(unsafe_code)]

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    os::unix::{
        fs::{DirEntryExt, FileExt, MetadataExt, OpenOptionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use graft_config::{FsMode, LayerConfig};
use graft_protocol::codec::MAX_CHUNK_LEN;
use graft_protocol::{
    PROTOCOL_VERSION,
    codec::{read_frame, write_frame},
    layer::{LayerRequest, LayerResponse},
    remote::{DirEntry, FileStat, RemoteError, RemoteRequest, RemoteResponse},
};

/// The layer `cargo test` just built: next to the test binary in `deps/` (the
/// copy in `target/debug/` is only refreshed by `cargo build`).
fn layer_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let fresh = deps.join("libgraft_layer.so");
    if fresh.exists() {
        fresh
    } else {
        deps.parent().unwrap().join("libgraft_layer.so")
    }
}

/// The target's root as the fake agent serves it, and what it was asked.
struct Target {
    root: tempfile::TempDir,
    handles: Mutex<HashMap<u64, File>>,
    next: AtomicU64,
    seen: Mutex<Vec<RemoteRequest>>,
}

fn os_err(e: std::io::Error) -> RemoteResponse {
    RemoteResponse::Error(RemoteError::Os(e.raw_os_error().unwrap_or(libc::EIO)))
}

fn file_stat(m: &std::fs::Metadata) -> FileStat {
    FileStat {
        dev: m.dev(),
        ino: m.ino(),
        mode: m.mode(),
        nlink: m.nlink(),
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev(),
        size: m.size(),
        blksize: m.blksize(),
        blocks: m.blocks(),
        atime: m.atime(),
        atime_nsec: m.atime_nsec(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
        ctime: m.ctime(),
        ctime_nsec: m.ctime_nsec(),
    }
}

impl Target {
    fn new() -> Target {
        let root = tempfile::tempdir().unwrap();
        let t = Target {
            root,
            handles: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            seen: Mutex::new(Vec::new()),
        };
        t.write("/srv/fake/remote.txt", "remote content\nsecond line\n");
        t.write("/srv/fake/sub/inner.txt", "inner\n");
        t.write("/srv/fake/sub/other.txt", "other\n");
        std::os::unix::fs::symlink("remote.txt", t.at("/srv/fake/link")).unwrap();
        t
    }

    fn at(&self, path: &str) -> PathBuf {
        self.root.path().join(path.trim_start_matches('/'))
    }

    fn write(&self, path: &str, content: &str) {
        let p = self.at(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn read(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(self.at(path)).ok()
    }

    /// Paths the layer asked about.
    fn paths(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| match r {
                RemoteRequest::Open { path, .. }
                | RemoteRequest::Stat { path, .. }
                | RemoteRequest::ReadDir { path }
                | RemoteRequest::Access { path, .. }
                | RemoteRequest::MkDir { path, .. }
                | RemoteRequest::Remove { path, .. }
                | RemoteRequest::ReadLink { path } => Some(path.clone()),
                RemoteRequest::Rename { from, .. } => Some(from.clone()),
                _ => None,
            })
            .collect()
    }

    fn names(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| match r {
                RemoteRequest::Resolve { host, .. } => Some(host.clone()),
                _ => None,
            })
            .collect()
    }

    fn answer(&self, request: &RemoteRequest) -> RemoteResponse {
        self.seen.lock().unwrap().push(request.clone());
        match request {
            RemoteRequest::Resolve { host, family } => {
                use graft_protocol::remote::AddressFamily::*;
                match (host.as_str(), family) {
                    ("only-remote.test", Any | V4) => RemoteResponse::Resolved {
                        addrs: vec!["198.18.7.7".parse().unwrap()],
                        canonical: None,
                    },
                    ("dual.test", _) => RemoteResponse::Resolved {
                        addrs: match family {
                            V4 => vec!["198.18.7.8".parse().unwrap()],
                            V6 => vec!["2001:db8::8".parse().unwrap()],
                            Any => vec![
                                "2001:db8::8".parse().unwrap(),
                                "198.18.7.8".parse().unwrap(),
                            ],
                        },
                        canonical: Some("canonical.dual.test".into()),
                    },
                    ("again.test", _) => RemoteResponse::Error(RemoteError::TryAgain),
                    _ => RemoteResponse::Error(RemoteError::NoName),
                }
            }
            RemoteRequest::Open { path, flags, mode } => {
                let mut o = OpenOptions::new();
                o.read(flags.read)
                    .write(flags.write)
                    .append(flags.append)
                    .truncate(flags.truncate)
                    .mode(*mode);
                if flags.create && flags.exclusive {
                    o.create_new(true);
                } else {
                    o.create(flags.create);
                }
                if flags.no_follow {
                    o.custom_flags(libc::O_NOFOLLOW);
                }
                match o.open(self.at(path)).and_then(|f| Ok((f.metadata()?, f))) {
                    Ok((m, f)) => {
                        let handle = self.next.fetch_add(1, Ordering::Relaxed);
                        self.handles.lock().unwrap().insert(handle, f);
                        RemoteResponse::Opened {
                            handle,
                            stat: file_stat(&m),
                        }
                    }
                    Err(e) => os_err(e),
                }
            }
            RemoteRequest::ReadFile { path, no_follow } => {
                let mut o = OpenOptions::new();
                o.read(true);
                if *no_follow {
                    o.custom_flags(libc::O_NOFOLLOW);
                }
                let (m, f) = match o.open(self.at(path)).and_then(|f| Ok((f.metadata()?, f))) {
                    Ok(opened) => opened,
                    Err(e) => return os_err(e),
                };
                if m.is_dir() {
                    return RemoteResponse::File {
                        stat: file_stat(&m),
                        data: Vec::new(),
                        rest: None,
                    };
                }
                let mut data = vec![0; MAX_CHUNK_LEN];
                let mut got = 0;
                while got < data.len() {
                    match f.read_at(&mut data[got..], got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) => return os_err(e),
                    }
                }
                data.truncate(got);
                let rest = (got == MAX_CHUNK_LEN).then(|| {
                    let handle = self.next.fetch_add(1, Ordering::Relaxed);
                    self.handles.lock().unwrap().insert(handle, f);
                    handle
                });
                RemoteResponse::File {
                    stat: file_stat(&m),
                    data,
                    rest,
                }
            }
            RemoteRequest::Read {
                handle,
                offset,
                len,
            } => {
                let handles = self.handles.lock().unwrap();
                let f = &handles[handle];
                let mut buf = vec![0; *len as usize];
                let mut got = 0;
                loop {
                    match f.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) => return os_err(e),
                    }
                    if got == buf.len() {
                        break;
                    }
                }
                buf.truncate(got);
                RemoteResponse::Data(buf)
            }
            RemoteRequest::Write {
                handle,
                offset,
                data,
            } => match self.handles.lock().unwrap()[handle].write_all_at(data, *offset) {
                Ok(()) => RemoteResponse::Written(data.len() as u64),
                Err(e) => os_err(e),
            },
            RemoteRequest::Truncate { handle, len } => {
                match self.handles.lock().unwrap()[handle].set_len(*len) {
                    Ok(()) => RemoteResponse::Done,
                    Err(e) => os_err(e),
                }
            }
            RemoteRequest::Close { handle } => match self.handles.lock().unwrap().remove(handle) {
                Some(_) => RemoteResponse::Done,
                None => RemoteResponse::Error(RemoteError::Os(libc::EBADF)),
            },
            RemoteRequest::Stat { path, follow } => {
                let m = if *follow {
                    std::fs::metadata(self.at(path))
                } else {
                    std::fs::symlink_metadata(self.at(path))
                };
                match m {
                    Ok(m) => RemoteResponse::Stat(file_stat(&m)),
                    Err(e) => os_err(e),
                }
            }
            RemoteRequest::ReadDir { path } => match std::fs::read_dir(self.at(path)) {
                Ok(entries) => RemoteResponse::Dir(
                    entries
                        .map(|e| {
                            let e = e.unwrap();
                            let ft = e.file_type().unwrap();
                            DirEntry {
                                name: e.file_name().to_string_lossy().into_owned(),
                                ino: e.ino(),
                                kind: if ft.is_dir() {
                                    libc::DT_DIR
                                } else if ft.is_symlink() {
                                    libc::DT_LNK
                                } else {
                                    libc::DT_REG
                                },
                            }
                        })
                        .collect(),
                ),
                Err(e) => os_err(e),
            },
            RemoteRequest::Access { path, mode } => {
                let c = std::ffi::CString::new(self.at(path).into_os_string().into_encoded_bytes())
                    .unwrap();
                // SAFETY: a valid C string.
                if unsafe { libc::access(c.as_ptr(), *mode) } == 0 {
                    RemoteResponse::Done
                } else {
                    os_err(std::io::Error::last_os_error())
                }
            }
            RemoteRequest::MkDir { path, .. } => match std::fs::create_dir(self.at(path)) {
                Ok(()) => RemoteResponse::Done,
                Err(e) => os_err(e),
            },
            RemoteRequest::Remove { path, dir } => {
                let r = if *dir {
                    std::fs::remove_dir(self.at(path))
                } else {
                    std::fs::remove_file(self.at(path))
                };
                match r {
                    Ok(()) => RemoteResponse::Done,
                    Err(e) => os_err(e),
                }
            }
            RemoteRequest::Rename { from, to } => {
                match std::fs::rename(self.at(from), self.at(to)) {
                    Ok(()) => RemoteResponse::Done,
                    Err(e) => os_err(e),
                }
            }
            RemoteRequest::ReadLink { path } => match std::fs::read_link(self.at(path)) {
                Ok(t) => RemoteResponse::Link(t.to_string_lossy().into_owned()),
                Err(e) => os_err(e),
            },
            RemoteRequest::Env => RemoteResponse::Env(vec![]),
            RemoteRequest::Sessions => RemoteResponse::Sessions(vec![]),
            // This fake proxy passes no descriptors: the layer never asks.
            RemoteRequest::OpenFd { .. }
            | RemoteRequest::ConnectFd { .. }
            | RemoteRequest::TargetRoot => RemoteResponse::Error(RemoteError::Unsupported(
                "no descriptors from the fake proxy".into(),
            )),
        }
    }
}

/// A fake proxy in front of a [`Target`].
struct FakeProxy {
    socket: PathBuf,
    target: Arc<Target>,
    log: PathBuf,
}

fn serve(stream: &mut UnixStream, target: &Target) {
    while let Ok(request) = read_frame::<_, LayerRequest>(stream) {
        let response = match &request {
            LayerRequest::Hello { .. } => LayerResponse::Hello {
                version: PROTOCOL_VERSION.into(),
            },
            LayerRequest::Remote(r) => LayerResponse::Remote(target.answer(r)),
            other => LayerResponse::Error {
                errno: libc::EINVAL,
                message: format!("unexpected {other:?}"),
            },
        };
        if write_frame(stream, &response).is_err() {
            return;
        }
    }
}

impl FakeProxy {
    fn start() -> FakeProxy {
        let target = Arc::new(Target::new());
        let socket = target.root.path().with_extension("sock");
        let log = target.root.path().with_extension("log");
        let listener = UnixListener::bind(&socket).unwrap();
        let t = target.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let t = t.clone();
                thread::spawn(move || serve(&mut stream, &t));
            }
        });
        FakeProxy {
            socket,
            target,
            log,
        }
    }

    fn config(&self, fs: FsMode) -> LayerConfig {
        LayerConfig {
            fs,
            local_dirs: vec![
                std::env::current_dir()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
            ],
            log_file: Some(self.log.clone()),
            log_level: "debug".into(),
            ..LayerConfig::default()
        }
    }

    fn run(&self, config: &LayerConfig, program: &str, args: &[&str]) -> Output {
        let mut child = Command::new(program)
            .args(args)
            .env("LD_PRELOAD", layer_path())
            .env(graft_protocol::layer::SOCKET_ENV, &self.socket)
            .env(
                graft_protocol::layer::CONFIG_ENV,
                serde_json::to_string(config).unwrap(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

    /// Runs and returns stdout, failing with everything useful when it failed.
    fn ok(&self, config: &LayerConfig, program: &str, args: &[&str]) -> String {
        let out = self.run(config, program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}\nstdout: {}\nstderr: {}\nlayer log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn python(&self, config: &LayerConfig, script: &str) -> String {
        self.ok(config, "/usr/bin/python3", &["-c", script])
    }

    /// No request named a path of the program's own world.
    fn assert_nothing_local_asked(&self) {
        for path in self.target.paths() {
            for local in ["/usr", "/lib", "/bin", "/proc", "/tmp", "/dev", "/sys"] {
                assert!(
                    !path.starts_with(local),
                    "the layer asked the target about {path}"
                );
            }
        }
    }
}

impl Drop for FakeProxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.log);
    }
}

#[test]
fn cat_and_ls_see_the_remote_files() {
    let proxy = FakeProxy::start();
    let config = proxy.config(FsMode::Read);
    assert_eq!(
        proxy.ok(&config, "cat", &["/srv/fake/remote.txt"]),
        "remote content\nsecond line\n"
    );
    assert_eq!(
        proxy.ok(&config, "ls", &["/srv/fake"]),
        "link\nremote.txt\nsub\n"
    );
    let long = proxy.ok(&config, "ls", &["-l", "/srv/fake/remote.txt"]);
    assert!(long.contains(" 27 "), "{long}");
    let out = proxy.run(&config, "ls", &["-l", "/srv/fake"]);
    let (long, errors) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success() && errors.is_empty(), "{errors}");
    assert!(long.contains("link -> remote.txt"), "{long}");
    let mut found: Vec<String> = proxy
        .ok(&config, "find", &["/srv/fake"])
        .lines()
        .map(str::to_owned)
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            "/srv/fake",
            "/srv/fake/link",
            "/srv/fake/remote.txt",
            "/srv/fake/sub",
            "/srv/fake/sub/inner.txt",
            "/srv/fake/sub/other.txt"
        ]
    );
    assert_eq!(
        proxy.ok(&config, "grep", &["-r", "inner", "/srv/fake"]),
        "/srv/fake/sub/inner.txt:inner\n"
    );
    assert_eq!(
        proxy.ok(&config, "tail", &["-n1", "/srv/fake/link"]),
        "second line\n"
    );
    let all = proxy.ok(&config, "ls", &["-a", "/srv/fake/sub"]);
    assert_eq!(all, ".\n..\ninner.txt\nother.txt\n");
    let err = proxy.run(&config, "cat", &["/srv/fake/missing"]);
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("No such file or directory"),
        "{err:?}"
    );
    proxy.assert_nothing_local_asked();
}

#[test]
fn python_reads_lists_and_stats_remote_paths() {
    let proxy = FakeProxy::start();
    let local = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(local.path(), "local file").unwrap();
    let script = format!(
        r#"
import os
print(open('/srv/fake/remote.txt').readlines())
print(sorted(os.listdir('/srv/fake')))
print(os.stat('/srv/fake/remote.txt').st_size)
print(os.path.exists('/srv/fake/remote.txt'), os.path.exists('/srv/fake/missing'))
print(os.path.isdir('/srv/fake/sub'), os.path.isfile('/srv/fake/sub'))
print(sorted((e.name, e.is_file()) for e in os.scandir('/srv/fake/sub')))
print(os.readlink('/srv/fake/link'), os.path.islink('/srv/fake/link'))
with open('/srv/fake/remote.txt', 'rb') as f:
    f.seek(7)
    print(f.read(7), os.fstat(f.fileno()).st_size)
try:
    open('/srv/fake/missing')
except FileNotFoundError:
    print('missing')
fd = os.open('/srv/fake/sub', os.O_RDONLY | os.O_DIRECTORY)
print(sorted(os.listdir(fd)))
print(os.stat('inner.txt', dir_fd=fd).st_size)
with open(os.open('inner.txt', os.O_RDONLY, dir_fd=fd)) as f:
    print(f.read().strip())
os.close(fd)
print(os.access('/srv/fake/remote.txt', os.R_OK))
print(open({local:?}).read())
print('env' in os.listdir('/usr/bin'), os.path.exists('/usr/bin/env'))
"#,
        local = local.path().to_str().unwrap()
    );
    let out = proxy.python(&proxy.config(FsMode::Read), &script);
    let expected = "\
['remote content\\n', 'second line\\n']
['link', 'remote.txt', 'sub']
27
True False
True False
[('inner.txt', True), ('other.txt', True)]
remote.txt True
b'content' 27
missing
['inner.txt', 'other.txt']
6
inner
True
local file
True True
";
    assert_eq!(out, expected);
    proxy.assert_nothing_local_asked();
}

#[test]
fn files_off_never_asks() {
    let proxy = FakeProxy::start();
    let out = proxy.run(
        &proxy.config(FsMode::Local),
        "cat",
        &["/srv/fake/remote.txt"],
    );
    assert!(!out.status.success());
    assert!(proxy.target.paths().is_empty());
}

#[test]
fn write_mode_creates_and_overwrites_in_the_target() {
    let proxy = FakeProxy::start();
    let config = proxy.config(FsMode::Write);
    proxy.ok(&config, "sh", &["-c", "echo hello > /srv/fake/new.txt"]);
    assert_eq!(proxy.target.read("/srv/fake/new.txt").unwrap(), "hello\n");
    let out = proxy.python(
        &config,
        r#"
import os
with open('/srv/fake/remote.txt', 'w') as f:
    f.write('replaced')
with open('/srv/fake/sub/inner.txt', 'a') as f:
    f.write('appended\n')
with open('/srv/fake/sub/other.txt', 'r+') as f:
    f.seek(2)
    f.write('X')
    f.flush()
    os.fsync(f.fileno())
    print(os.fstat(f.fileno()).st_size)
os.mkdir('/srv/fake/made')
os.rename('/srv/fake/new.txt', '/srv/fake/made/moved.txt')
os.unlink('/srv/fake/link')
fd = os.open('/srv/fake/raw.bin', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(fd, b'raw')
fd2 = os.dup(fd)
os.close(fd)
os.write(fd2, b'+dup')
os.close(fd2)
print(open('/srv/fake/remote.txt').read())
import ctypes
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.freopen.restype = ctypes.c_void_p
libc.fputs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
libc.freopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
f = libc.fopen(b'/srv/fake/stdio.txt', b'w')
libc.fputs(b'via stdio', f)
f = libc.freopen(b'/srv/fake/stdio2.txt', b'w', f)
libc.fputs(b'via freopen', f)
print(libc.fclose(f))
"#,
    );
    assert_eq!(out, "6\nreplaced\n0\n");
    assert_eq!(
        proxy.target.read("/srv/fake/stdio.txt").unwrap(),
        "via stdio"
    );
    assert_eq!(
        proxy.target.read("/srv/fake/stdio2.txt").unwrap(),
        "via freopen"
    );
    let t = &proxy.target;
    assert_eq!(t.read("/srv/fake/remote.txt").unwrap(), "replaced");
    assert_eq!(
        t.read("/srv/fake/sub/inner.txt").unwrap(),
        "inner\nappended\n"
    );
    assert_eq!(t.read("/srv/fake/sub/other.txt").unwrap(), "otXer\n");
    assert_eq!(t.read("/srv/fake/made/moved.txt").unwrap(), "hello\n");
    assert_eq!(t.read("/srv/fake/raw.bin").unwrap(), "raw+dup");
    assert!(!t.at("/srv/fake/link").exists());
    assert!(t.handles.lock().unwrap().is_empty(), "handles left open");
    proxy.assert_nothing_local_asked();
}

#[test]
fn read_mode_keeps_writes_local() {
    let proxy = FakeProxy::start();
    // A local directory the rules make remote: reads go to the target, writes stay here.
    let local = tempfile::tempdir().unwrap();
    let dir = local.path().to_str().unwrap().to_owned();
    proxy
        .target
        .write(&format!("{dir}/remote.txt"), "from the target");
    let mut config = proxy.config(FsMode::Read);
    config.fs_remote = vec![format!("^{}/", regex_escape(&dir))];
    let out = proxy.python(
        &config,
        &format!(
            r#"
import os
print(open('{dir}/remote.txt').read())
with open('{dir}/out.txt', 'w') as f:
    f.write('local write')
os.mkdir('{dir}/made')
print(open('{dir}/out.txt').read() if False else 'written')
"#
        ),
    );
    assert_eq!(out, "from the target\nwritten\n");
    assert_eq!(
        std::fs::read_to_string(local.path().join("out.txt")).unwrap(),
        "local write"
    );
    assert!(local.path().join("made").is_dir());
    assert!(proxy.target.read(&format!("{dir}/out.txt")).is_none());
    assert!(!proxy.target.at(&format!("{dir}/made")).exists());
    let writes = proxy
        .target
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| {
            matches!(r, RemoteRequest::Open { flags, .. } if flags.write || flags.create)
                || matches!(r, RemoteRequest::MkDir { .. })
        })
        .count();
    assert_eq!(writes, 0);
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '/' || c == '_' || c == '-' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}

#[test]
fn getent_resolves_names_only_the_target_knows() {
    let proxy = FakeProxy::start();
    let config = proxy.config(FsMode::Read);
    let hosts = proxy.ok(&config, "getent", &["hosts", "only-remote.test"]);
    assert_eq!(
        hosts.split_whitespace().collect::<Vec<_>>(),
        ["198.18.7.7", "only-remote.test"]
    );
    let ahosts = proxy.ok(&config, "getent", &["ahosts", "only-remote.test"]);
    let lines: Vec<Vec<&str>> = ahosts
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0], ["198.18.7.7", "STREAM", "only-remote.test"]);
    assert_eq!(lines[1], ["198.18.7.7", "DGRAM"]);
    assert_eq!(lines[2], ["198.18.7.7", "RAW"]);
    let v6 = proxy.ok(&config, "getent", &["ahostsv6", "dual.test"]);
    assert!(v6.starts_with("2001:db8::8"), "{v6}");
    let missing = proxy.run(&config, "getent", &["hosts", "nope.test"]);
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
    // Numeric and localhost names never reach the proxy.
    proxy.ok(&config, "getent", &["ahosts", "127.0.0.1"]);
    proxy.ok(&config, "getent", &["hosts", "localhost"]);
    assert!(
        proxy
            .target
            .names()
            .iter()
            .all(|n| n != "127.0.0.1" && n != "localhost"),
        "{:?}",
        proxy.target.names()
    );
}

#[test]
fn python_resolves_through_the_target() {
    let proxy = FakeProxy::start();
    let out = proxy.python(
        &proxy.config(FsMode::Read),
        r#"
import socket
print(socket.getaddrinfo('only-remote.test', 80, type=socket.SOCK_STREAM))
print(socket.getaddrinfo('only-remote.test', 'http', socket.AF_INET, socket.SOCK_STREAM))
print(len(socket.getaddrinfo('only-remote.test', 53)))
print(socket.gethostbyname('only-remote.test'))
print(socket.gethostbyname_ex('dual.test'))
print(socket.getaddrinfo('dual.test', 443, socket.AF_INET6, socket.SOCK_STREAM)[0][4][0])
print(socket.getaddrinfo('dual.test', None, proto=socket.IPPROTO_TCP, flags=socket.AI_CANONNAME)[0][3])
for name in ('nope.test', 'again.test'):
    try:
        socket.getaddrinfo(name, 80)
    except socket.gaierror as e:
        print(e.errno == socket.EAI_NONAME, e.errno == socket.EAI_AGAIN)
print(socket.getaddrinfo('localhost', 80, socket.AF_INET, socket.SOCK_STREAM)[0][4])
"#,
    );
    let expected = "\
[(<AddressFamily.AF_INET: 2>, <SocketKind.SOCK_STREAM: 1>, 6, '', ('198.18.7.7', 80))]
[(<AddressFamily.AF_INET: 2>, <SocketKind.SOCK_STREAM: 1>, 6, '', ('198.18.7.7', 80))]
3
198.18.7.7
('canonical.dual.test', [], ['198.18.7.8'])
2001:db8::8
canonical.dual.test
True False
False True
('127.0.0.1', 80)
";
    assert_eq!(out, expected);
    assert!(!proxy.target.names().contains(&"localhost".to_owned()));
}

const C_PROGRAM: &str = r#"
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void list(DIR *d) {
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.') printf("entry %s %d\n", e->d_name, e->d_type);
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "/srv/fake/remote.txt";
    int flags = argc > 2 ? atoi(argv[2]) : O_RDONLY;
    int fd = open(path, flags);
    if (fd < 0) { perror("open"); return 1; }
    char buf[64];
    ssize_t n = read(fd, buf, 6);
    printf("read %.*s\n", (int)n, buf);
    n = pread(fd, buf, 7, 7);
    printf("pread %.*s\n", (int)n, buf);
    printf("lseek %ld\n", (long)lseek(fd, 0, SEEK_END));
    struct stat st;
    fstat(fd, &st);
    printf("fstat %ld %s\n", (long)st.st_size, S_ISREG(st.st_mode) ? "reg" : "other");
    printf("write %s\n", write(fd, "x", 1) < 0 && errno == EBADF ? "EBADF" : "ok?");
    close(fd);
    if (stat(path, &st) == 0) printf("stat %ld\n", (long)st.st_size);
    if (lstat("/srv/fake/link", &st) == 0) printf("lstat %s\n", S_ISLNK(st.st_mode) ? "link" : "other");
    printf("access %d %d\n", access(path, R_OK), access("/srv/fake/missing", F_OK) == -1 && errno == ENOENT);

    DIR *d = opendir("/srv/fake/sub");
    if (!d) { perror("opendir"); return 1; }
    list(d);
    rewinddir(d);
    int again = 0;
    while (readdir(d)) again++;
    printf("again %d\n", again);
    struct stat dst;
    printf("dirfd %d\n", fstat(dirfd(d), &dst) == 0 && S_ISDIR(dst.st_mode));
    closedir(d);

    int dfd = open("/srv/fake/sub", O_RDONLY | O_DIRECTORY);
    int ifd = openat(dfd, "inner.txt", O_RDONLY);
    n = read(ifd, buf, sizeof buf);
    printf("openat %.*s", (int)n, buf);
    close(ifd);
    if (fstatat(dfd, "other.txt", &st, 0) == 0) printf("fstatat %ld\n", (long)st.st_size);
    d = fdopendir(dfd);
    list(d);
    closedir(d);

    char *rp = realpath("/srv/fake/sub/../link", NULL);
    printf("realpath %s\n", rp ? rp : "(null)");
    free(rp);
    printf("realpath missing %d\n", realpath("/srv/fake/nope/x", NULL) == NULL && errno == ENOENT);

    FILE *f = fopen(path, "r");
    char line[64];
    while (fgets(line, sizeof line, f)) printf("line %s", line);
    fclose(f);

    struct hostent he, *r = NULL;
    char hb[1024];
    int herr = 0;
    int rc = gethostbyname_r("only-remote.test", &he, hb, sizeof hb, &r, &herr);
    if (rc == 0 && r) printf("ghbn_r %s %s\n", r->h_name, inet_ntoa(*(struct in_addr *)r->h_addr_list[0]));
    rc = gethostbyname_r("only-remote.test", &he, hb, 8, &r, &herr);
    printf("small %d %d\n", rc == ERANGE, r == NULL);
    rc = gethostbyname_r("nope.test", &he, hb, sizeof hb, &r, &herr);
    printf("nope %d %d %d\n", rc, r == NULL, herr == HOST_NOT_FOUND);
    struct hostent *h = gethostbyname("only-remote.test");
    if (h) printf("ghbn %s %d\n", inet_ntoa(*(struct in_addr *)h->h_addr_list[0]), h->h_length);
    h = gethostbyname2("dual.test", AF_INET6);
    char text[64];
    if (h) printf("ghbn2 %s %s\n", h->h_name, inet_ntop(AF_INET6, h->h_addr_list[0], text, sizeof text));
    h = gethostbyname("nope.test");
    printf("ghbn nope %d %d\n", h == NULL, h_errno == HOST_NOT_FOUND);
    struct addrinfo hints = {0}, *res;
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo("only-remote.test", "8080", &hints, &res);
    if (rc == 0) {
        struct sockaddr_in *sin = (struct sockaddr_in *)res->ai_addr;
        printf("gai %s %d %d\n", inet_ntoa(sin->sin_addr), ntohs(sin->sin_port), res->ai_next == NULL);
        freeaddrinfo(res);
    }
    rc = getaddrinfo("127.0.0.1", "80", &hints, &res);
    if (rc == 0) freeaddrinfo(res);
    printf("gai local %d\n", rc);
    return 0;
}
"#;

const C_EXPECTED: &str = "\
read remote
pread content
lseek 27
fstat 27 reg
write EBADF
stat 27
lstat link
access 0 1
entry inner.txt 8
entry other.txt 8
again 4
dirfd 1
openat inner
fstatat 6
entry inner.txt 8
entry other.txt 8
realpath /srv/fake/remote.txt
realpath missing 1
line remote content
line second line
ghbn_r only-remote.test 198.18.7.7
small 1 1
nope 0 1 1
ghbn 198.18.7.7 4
ghbn2 canonical.dual.test 2001:db8::8
ghbn nope 1 1
gai 198.18.7.7 8080 1
gai local 0
";

fn sorted_entries(text: &str) -> String {
    // readdir order is the target's; compare the listing blocks sorted.
    let mut lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let start = i;
        while i < lines.len() && lines[i].starts_with("entry ") {
            i += 1;
        }
        lines[start..i].sort_unstable();
        i = i.max(start + 1);
    }
    lines.join("\n") + "\n"
}

#[test]
fn a_c_program_sees_remote_files_and_names() {
    let proxy = FakeProxy::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("prog.c");
    std::fs::write(&src, C_PROGRAM).unwrap();
    let config = proxy.config(FsMode::Read);
    // Plain, and large-file + fortified (open64, __open_2, stat64, readdir64 ...).
    for (name, flags) in [
        ("plain", &[][..]),
        (
            "lfs",
            &["-O2", "-D_FORTIFY_SOURCE=2", "-D_FILE_OFFSET_BITS=64"][..],
        ),
    ] {
        let exe = dir.path().join(name);
        let status = Command::new("cc")
            .args(flags)
            .arg("-o")
            .arg(&exe)
            .arg(&src)
            .status()
            .unwrap();
        assert!(status.success());
        let out = proxy.ok(&config, exe.to_str().unwrap(), &[]);
        assert_eq!(sorted_entries(&out), C_EXPECTED, "{name}");
    }
    proxy.assert_nothing_local_asked();
}

#[test]
fn layer_path_exists() {
    assert!(Path::new(&layer_path()).exists(), "{:?}", layer_path());
}

/// Exploration aid: `GRAFT_TRY='cmd args' cargo test -p graft-layer --test files_dns try_command -- --ignored --nocapture`.
#[test]
#[ignore]
fn try_command() {
    let proxy = FakeProxy::start();
    let mode = match std::env::var("GRAFT_TRY_MODE").as_deref() {
        Ok("write") => FsMode::Write,
        _ => FsMode::Read,
    };
    let cmd = std::env::var("GRAFT_TRY").unwrap();
    let out = proxy.run(&proxy.config(mode), "sh", &["-c", &cmd]);
    println!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("--- requests\n{:?}", proxy.target.seen.lock().unwrap());
}

#[test]
fn large_files_travel_in_chunks_both_ways() {
    let proxy = FakeProxy::start();
    let big: String = (0..300_000)
        .map(|i| format!("{:09}\n", i % 1_000_000_000))
        .collect();
    assert!(big.len() > 2 * 1024 * 1024 + 1);
    proxy.target.write("/srv/fake/big.txt", &big);
    let out = proxy.python(
        &proxy.config(FsMode::Write),
        r#"
import hashlib
data = open('/srv/fake/big.txt', 'rb').read()
print(len(data), hashlib.sha256(data).hexdigest())
with open('/srv/fake/big-copy.txt', 'wb') as f:
    f.write(data[::-1])
"#,
    );
    let expected_hash = {
        let out = Command::new("sha256sum")
            .arg(proxy.target.at("/srv/fake/big.txt"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(out, format!("{} {expected_hash}\n", big.len()));
    let copy = proxy.target.read("/srv/fake/big-copy.txt").unwrap();
    assert_eq!(copy, big.chars().rev().collect::<String>());
    let reads = proxy
        .target
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| {
            matches!(
                r,
                RemoteRequest::ReadFile { .. } | RemoteRequest::Read { .. }
            )
        })
        .count();
    assert_eq!(
        reads, 3,
        "the first 1 MiB with ReadFile, then 1 MiB Reads until a short one"
    );
}
