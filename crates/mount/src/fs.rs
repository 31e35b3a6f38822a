//! The FUSE filesystem: each kernel request becomes [`RemoteRequest`]s on the
//! session, answered by the agent inside the target's root.
//!
//! FUSE callbacks run on fuser's worker threads and are synchronous; each one
//! blocks on the session's async call with the runtime handle, bounded by
//! [`REQUEST_TIMEOUT`]. Symlinks are resolved by the agent inside the target's root
//! (`openat2(RESOLVE_IN_ROOT)`) and shown as what they point to, never as links the
//! local kernel would resolve against this machine's root (see the crate docs).

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenAccMode, OpenFlags as FuseOpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use graft_protocol::codec::MAX_CHUNK_LEN;
use graft_protocol::remote::{
    DirEntry, FileStat, OpenFlags, RemoteError, RemoteRequest, RemoteResponse,
};
use graft_proxy::Session;

use crate::links;
use crate::nodes::Nodes;
use crate::placeholders::{Placeholder, Placeholders};

/// How long the kernel may cache a file's attributes and a name's lookup before
/// asking again (`entry_timeout` / `attr_timeout` of `fuse(8)`): changes made in
/// the target show up within this time.
pub const ATTR_TTL: Duration = Duration::from_secs(1);

/// The longest one request may wait for the agent's answer; after it the
/// program's system call fails with `EIO`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// One listed directory entry: name, node id hint, kind.
type Listed = (String, u64, FileType);

/// The filesystem fuser drives.
pub struct RemoteFs {
    session: Arc<Session>,
    runtime: tokio::runtime::Handle,
    nodes: Nodes,
    writable: bool,
    /// Set when the mount is being taken down: every request fails at once.
    closing: Arc<AtomicBool>,
    /// Directory listings taken at `opendir`, served by `readdir` by offset.
    listings: Mutex<std::collections::HashMap<u64, Arc<Vec<Listed>>>>,
    next_listing: AtomicU64,
    /// Paths shown whatever the target holds (mount points for local files).
    placeholders: Placeholders,
}

impl RemoteFs {
    pub fn new(
        session: Arc<Session>,
        runtime: tokio::runtime::Handle,
        root: &str,
        writable: bool,
        closing: Arc<AtomicBool>,
        placeholders: Placeholders,
    ) -> RemoteFs {
        RemoteFs {
            placeholders,
            session,
            runtime,
            nodes: Nodes::new(root),
            writable,
            closing,
            listings: Mutex::new(std::collections::HashMap::new()),
            next_listing: AtomicU64::new(1),
        }
    }

    /// Sends one request and waits for its answer; errors become the errno the
    /// program sees (`EIO` for a lost link or a timeout).
    fn call(&self, request: RemoteRequest) -> Result<RemoteResponse, Errno> {
        if self.closing.load(Ordering::Relaxed) {
            return Err(Errno::EIO);
        }
        let answer = self.runtime.block_on(async {
            tokio::time::timeout(REQUEST_TIMEOUT, self.session.remote(request)).await
        });
        match answer {
            Ok(Ok(RemoteResponse::Error(error))) => Err(errno_of(&error)),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => {
                tracing::debug!("mount: remote request failed: {error}");
                Err(Errno::EIO)
            }
            Err(_) => {
                tracing::warn!(
                    "mount: the agent did not answer within {} s",
                    REQUEST_TIMEOUT.as_secs()
                );
                Err(Errno::EIO)
            }
        }
    }

    /// Metadata of a mount-relative path (`lstat`: a symlink is shown as one).
    fn stat(&self, path: &str) -> Result<FileStat, Errno> {
        match self.placeholders.get(path) {
            // Always the same answer: a mount point's kind and node never change
            // under the kernel (a changed kind would detach what is mounted on it).
            Some(Placeholder::Dir | Placeholder::File) => Ok(self.placeholders.stat(path)),
            Some(Placeholder::Above) => match self.lstat_remote(&self.nodes.remote(path)) {
                Ok(stat) if stat.is_dir() => Ok(stat),
                _ => Ok(self.placeholders.stat(path)),
            },
            None => self.lstat_remote(&self.nodes.remote(path)),
        }
    }

    fn lstat_remote(&self, remote: &str) -> Result<FileStat, Errno> {
        match self.call(RemoteRequest::Stat {
            path: remote.to_owned(),
            follow: false,
        })? {
            RemoteResponse::Stat(stat) => Ok(stat),
            other => Err(unexpected(&other)),
        }
    }

    /// What [`links::resolve`] needs to know about one absolute target path.
    fn probe(&self, remote: &str) -> Result<links::Probe, Errno> {
        match self.lstat_remote(remote) {
            Ok(stat) if stat.mode & libc::S_IFMT == libc::S_IFLNK => {
                match self.call(RemoteRequest::ReadLink {
                    path: remote.to_owned(),
                })? {
                    RemoteResponse::Link(text) => Ok(links::Probe::Link(text)),
                    other => Err(unexpected(&other)),
                }
            }
            Ok(_) => Ok(links::Probe::Other),
            Err(e) if e == Errno::ENOENT || e == Errno::ENOTDIR => Ok(links::Probe::Missing),
            Err(e) => Err(e),
        }
    }

    fn path(&self, ino: INodeNo) -> Result<String, Errno> {
        self.nodes.path(ino.0).ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<String, Errno> {
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        if name.is_empty() || name.contains('/') {
            return Err(Errno::EINVAL);
        }
        self.nodes.child(parent.0, name).ok_or(Errno::ENOENT)
    }

    fn check_writable(&self) -> Result<(), Errno> {
        if self.writable {
            Ok(())
        } else {
            Err(Errno::EROFS)
        }
    }

    /// Looks `path` up and counts the kernel's reference to it.
    fn entry(&self, path: &str) -> Result<FileAttr, Errno> {
        let stat = self.stat(path)?;
        let id = self.nodes.looked_up(path);
        Ok(attr(id, &stat))
    }

    fn list(&self, path: &str) -> Result<Vec<Listed>, Errno> {
        let listed = self.call(RemoteRequest::ReadDir {
            path: self.nodes.remote(path),
        });
        let mut entries = match listed {
            Ok(RemoteResponse::Dir(entries)) => entries,
            Ok(other) => return Err(unexpected(&other)),
            Err(_) if self.placeholders.get(path).is_some() => Vec::new(),
            Err(e) => return Err(e),
        };
        self.placeholders.add_children(path, &mut entries);
        let mut out = Vec::with_capacity(entries.len() + 2);
        out.push((".".to_owned(), 1, FileType::Directory));
        out.push(("..".to_owned(), 1, FileType::Directory));
        for DirEntry { name, ino, kind } in entries {
            let full = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}/{name}")
            };
            let kind = file_type_of_dtype(kind);
            let ino = self.nodes.known(&full).unwrap_or(ino.max(2));
            out.push((name, ino, kind));
        }
        Ok(out)
    }

    fn open_remote(
        &self,
        path: &str,
        flags: OpenFlags,
        mode: u32,
    ) -> Result<(u64, FileStat), Errno> {
        match self.call(RemoteRequest::Open {
            path: self.nodes.remote(path),
            flags,
            mode,
        })? {
            RemoteResponse::Opened { handle, stat } => Ok((handle, stat)),
            other => Err(unexpected(&other)),
        }
    }

    fn close_remote(&self, handle: u64) {
        if let Err(e) = self.call(RemoteRequest::Close { handle }) {
            tracing::debug!("mount: closing remote handle {handle}: {e:?}");
        }
    }

    fn truncate(&self, path: &str, fh: Option<FileHandle>, len: u64) -> Result<(), Errno> {
        let (handle, opened) = match fh {
            Some(fh) => (fh.0, false),
            None => {
                let flags = OpenFlags {
                    read: false,
                    write: true,
                    ..OpenFlags::default()
                };
                (self.open_remote(path, flags, 0)?.0, true)
            }
        };
        let result = self.call(RemoteRequest::Truncate { handle, len });
        if opened {
            self.close_remote(handle);
        }
        result.map(|_| ())
    }
}

/// The errno a failed remote request gives the program.
fn errno_of(error: &RemoteError) -> Errno {
    match error {
        RemoteError::Os(errno) if *errno > 0 => Errno::from_i32(*errno),
        RemoteError::Unsupported(_) => Errno::ENOSYS,
        _ => Errno::EIO,
    }
}

fn unexpected(response: &RemoteResponse) -> Errno {
    tracing::warn!("mount: unexpected answer from the agent: {response:?}");
    Errno::EIO
}

fn time(secs: i64, nsec: i64) -> SystemTime {
    let nsec = nsec.clamp(0, 999_999_999) as u32;
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsec.into())
    }
}

/// The FUSE file type of an `st_mode` (`inode(7)`).
fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// The FUSE file type of a `d_type` (`readdir(3)`).
fn file_type_of_dtype(kind: u8) -> FileType {
    file_type(u32::from(kind) << 12)
}

/// The kernel's view of a remote file: node id `id`, the target's metadata.
fn attr(id: u64, st: &FileStat) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: st.size,
        blocks: st.blocks,
        atime: time(st.atime, st.atime_nsec),
        mtime: time(st.mtime, st.mtime_nsec),
        ctime: time(st.ctime, st.ctime_nsec),
        crtime: time(st.ctime, st.ctime_nsec),
        kind: file_type(st.mode),
        perm: (st.mode & 0o7777) as u16,
        nlink: st.nlink.min(u64::from(u32::MAX)) as u32,
        uid: st.uid,
        gid: st.gid,
        rdev: st.rdev as u32,
        blksize: st.blksize.clamp(512, u64::from(u32::MAX)) as u32,
        flags: 0,
    }
}

/// The protocol's open flags for a FUSE `open`/`create` `flags` word.
fn open_flags(flags: i32) -> OpenFlags {
    let acc = flags & libc::O_ACCMODE;
    OpenFlags {
        read: acc == libc::O_RDONLY || acc == libc::O_RDWR,
        write: acc == libc::O_WRONLY || acc == libc::O_RDWR,
        create: flags & libc::O_CREAT != 0,
        exclusive: flags & libc::O_EXCL != 0,
        truncate: flags & libc::O_TRUNC != 0,
        append: flags & libc::O_APPEND != 0,
        directory: false,
        no_follow: false,
    }
}

impl Filesystem for RemoteFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // One FUSE write is one protocol Write; reads are asked in up to
        // MAX_CHUNK_LEN (the kernel's own limit is its max_pages).
        let _ = config.set_max_write(MAX_CHUNK_LEN as u32);
        if let Err(max) = config.set_max_readahead(MAX_CHUNK_LEN as u32) {
            let _ = config.set_max_readahead(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name).and_then(|path| self.entry(&path)) {
            Ok(attr) => reply.entry(&ATTR_TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.nodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.path(ino).and_then(|path| self.stat(&path)) {
            Ok(stat) => reply.attr(&ATTR_TTL, &attr(ino.0, &stat)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = (|| {
            self.check_writable()?;
            // The protocol carries no chmod, chown or utimes: refuse rather than
            // pretend.
            if mode.is_some()
                || uid.is_some()
                || gid.is_some()
                || atime.is_some()
                || mtime.is_some()
            {
                return Err(Errno::EPERM);
            }
            let path = self.path(ino)?;
            if let Some(len) = size {
                self.truncate(&path, fh, len)?;
            }
            self.stat(&path)
        })();
        match result {
            Ok(stat) => reply.attr(&ATTR_TTL, &attr(ino.0, &stat)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let result = (|| {
            let path = self.path(ino)?;
            let resolved = links::resolve(&self.nodes.remote(&path), |p| self.probe(p))?;
            match links::within(self.nodes.root(), &resolved) {
                Some(inside) => Ok(links::relative(&path, &inside)),
                // Out of the mounted subtree: where the target's path shows at its
                // own path (an isolated namespace), the link leads there.
                None if self.placeholders.shows_at_own_path(&resolved) => Ok(resolved),
                // Otherwise it has nothing to point to here.
                None => Err(Errno::EXDEV),
            }
        })();
        match result {
            Ok(text) => reply.data(text.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let result = (|| {
            self.check_writable()?;
            let path = self.child(parent, name)?;
            self.call(RemoteRequest::MkDir {
                path: self.nodes.remote(&path),
                mode: mode & !umask & 0o7777,
            })?;
            self.entry(&path)
        })();
        match result {
            Ok(attr) => reply.entry(&ATTR_TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.remove(parent, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.remove(parent, name, true));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            self.check_writable()?;
            if !flags.is_empty() {
                // RENAME_NOREPLACE / RENAME_EXCHANGE are not in the protocol.
                return Err(Errno::EINVAL);
            }
            let from = self.child(parent, name)?;
            let to = self.child(newparent, newname)?;
            self.call(RemoteRequest::Rename {
                from: self.nodes.remote(&from),
                to: self.nodes.remote(&to),
            })?;
            self.nodes.renamed(&from, &to);
            Ok(())
        })();
        reply_empty(reply, result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: FuseOpenFlags, reply: ReplyOpen) {
        let result = (|| {
            let wants_write = flags.acc_mode() != OpenAccMode::O_RDONLY
                || flags.0 & (libc::O_TRUNC | libc::O_APPEND) != 0;
            if wants_write {
                self.check_writable()?;
            }
            let path = self.path(ino)?;
            self.open_remote(&path, open_flags(flags.0), 0)
        })();
        match result {
            Ok((handle, _)) => reply.opened(FileHandle(handle), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: FuseOpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let request = RemoteRequest::Read {
            handle: fh.0,
            offset,
            len: size.min(MAX_CHUNK_LEN as u32),
        };
        match self.call(request) {
            Ok(RemoteResponse::Data(data)) => reply.data(&data),
            Ok(other) => reply.error(unexpected(&other)),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: FuseOpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = (|| {
            self.check_writable()?;
            let mut written = 0u64;
            for chunk in data.chunks(MAX_CHUNK_LEN) {
                match self.call(RemoteRequest::Write {
                    handle: fh.0,
                    offset: offset + written,
                    data: chunk.to_vec(),
                })? {
                    RemoteResponse::Written(n) => written += n,
                    other => return Err(unexpected(&other)),
                }
            }
            Ok(written)
        })();
        match result {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes reach the target's file at once (pwrite); nothing is buffered here.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: FuseOpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.close_remote(fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: FuseOpenFlags, reply: ReplyOpen) {
        match self.path(ino).and_then(|path| self.list(&path)) {
            Ok(listing) => {
                let id = self.next_listing.fetch_add(1, Ordering::Relaxed);
                self.listings
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(id, Arc::new(listing));
                reply.opened(FileHandle(id), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listing = self
            .listings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&fh.0)
            .cloned();
        let Some(listing) = listing else {
            reply.error(Errno::EBADF);
            return;
        };
        for (i, (name, ino, kind)) in listing.iter().enumerate().skip(offset as usize) {
            // The offset of an entry is that of the next one.
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: FuseOpenFlags,
        reply: ReplyEmpty,
    ) {
        self.listings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The protocol has no statfs: no sizes to report (df shows 0), names up
        // to NAME_MAX.
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let result = (|| {
            let path = self.path(ino)?;
            let mask = mask.bits();
            if mask & libc::W_OK != 0 && !self.writable {
                return Err(Errno::EROFS);
            }
            self.call(RemoteRequest::Access {
                path: self.nodes.remote(&path),
                mode: mask,
            })
            .map(|_| ())
        })();
        reply_empty(reply, result);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = (|| {
            self.check_writable()?;
            let path = self.child(parent, name)?;
            let mut open = open_flags(flags);
            open.create = true;
            let (handle, stat) = self.open_remote(&path, open, mode & !umask & 0o7777)?;
            let id = self.nodes.looked_up(&path);
            Ok((handle, attr(id, &stat)))
        })();
        match result {
            Ok((handle, attr)) => reply.created(
                &ATTR_TTL,
                &attr,
                Generation(0),
                FileHandle(handle),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }
}

impl RemoteFs {
    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Result<(), Errno> {
        self.check_writable()?;
        let path = self.child(parent, name)?;
        self.call(RemoteRequest::Remove {
            path: self.nodes.remote(&path),
            dir,
        })?;
        self.nodes.removed(&path);
        Ok(())
    }
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_flags_follow_the_access_mode() {
        let f = open_flags(libc::O_RDONLY);
        assert!(f.read && !f.write && !f.append);
        let f = open_flags(libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_EXCL);
        assert!(!f.read && f.write && f.append && f.create && f.exclusive);
        let f = open_flags(libc::O_RDWR | libc::O_TRUNC);
        assert!(f.read && f.write && f.truncate);
    }

    #[test]
    fn kinds_follow_the_mode_bits() {
        assert_eq!(file_type(0o040755), FileType::Directory);
        assert_eq!(file_type(0o100644), FileType::RegularFile);
        assert_eq!(file_type_of_dtype(4), FileType::Directory);
        assert_eq!(file_type_of_dtype(8), FileType::RegularFile);
    }

    #[test]
    fn remote_errors_keep_their_errno() {
        assert_eq!(errno_of(&RemoteError::Os(libc::ENOENT)), Errno::ENOENT);
        assert_eq!(errno_of(&RemoteError::Other("x".into())), Errno::EIO);
    }
}
