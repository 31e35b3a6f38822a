//! Which programs the LD_PRELOAD layer cannot reach, so `graft run` isolates them
//! by itself: statically linked ELF executables (no `PT_INTERP` program header,
//! so no dynamic loader ever reads `LD_PRELOAD`, ld.so(8)) and Go binaries (the
//! Go runtime makes its network system calls without libc, and its resolver
//! speaks DNS itself). A Go binary carries a `.go.buildinfo` section (Go ≥ 1.13)
//! or a `.note.go.buildid` note.

use std::{
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
};

use object::{
    Endianness, FileKind, Object,
    read::elf::{ElfFile, FileHeader, ProgramHeader},
};

/// Why a program is isolated without being asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// A Go binary.
    Go,
    /// A statically linked executable.
    Static,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Unreachable::Go => "a Go binary",
            Unreachable::Static => "statically linked",
        })
    }
}

/// The file `program` names: itself when it has a slash, else the first
/// executable match in `path` (a `PATH` value), as execvp(3) searches.
pub fn find(program: &OsStr, path: Option<&OsStr>) -> Option<PathBuf> {
    let program = Path::new(program);
    if program.components().count() > 1 || program.to_string_lossy().contains('/') {
        return Some(program.to_path_buf());
    }
    let path: OsString = path.map_or_else(|| OsString::from("/usr/bin:/bin"), OsStr::to_owned);
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Whether the layer cannot reach the program in `file`; `None` for a dynamic
/// non-Go ELF, a script, or anything that cannot be read.
pub fn unreachable(file: &Path) -> Option<Unreachable> {
    let data = std::fs::read(file).ok()?;
    classify(&data)
}

/// [`unreachable`] on a file's bytes.
pub fn classify(data: &[u8]) -> Option<Unreachable> {
    match FileKind::parse(data).ok()? {
        FileKind::Elf64 => elf::<object::elf::FileHeader64<Endianness>>(data),
        FileKind::Elf32 => elf::<object::elf::FileHeader32<Endianness>>(data),
        _ => None,
    }
}

fn elf<H: FileHeader<Endian = Endianness>>(data: &[u8]) -> Option<Unreachable> {
    let file = ElfFile::<H>::parse(data).ok()?;
    if file.section_by_name(".go.buildinfo").is_some()
        || file.section_by_name(".note.go.buildid").is_some()
    {
        return Some(Unreachable::Go);
    }
    let endian = file.endian();
    let headers = file.elf_program_headers();
    // An object file or a core dump has no program headers: not a program.
    if headers.is_empty() {
        return None;
    }
    let interpreted = headers
        .iter()
        .any(|ph| ph.p_type(endian) == object::elf::PT_INTERP);
    (!interpreted).then_some(Unreachable::Static)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_program_is_reachable_and_scripts_are_not_elf() {
        // The test binary itself is dynamically linked (cargo's default on glibc).
        let me = std::env::current_exe().unwrap();
        assert_eq!(unreachable(&me), None);
        assert_eq!(classify(b"#!/bin/sh\necho hi\n"), None);
        assert_eq!(classify(&[0x7f, b'E', b'L', b'F']), None);
    }

    #[test]
    fn find_searches_path_like_execvp() {
        let sh = find(
            OsStr::new("sh"),
            Some(OsStr::new("/nonexistent:/bin:/usr/bin")),
        );
        assert!(sh.is_some_and(|p| p.ends_with("sh")));
        assert_eq!(
            find(OsStr::new("./app"), None),
            Some(PathBuf::from("./app"))
        );
        assert_eq!(
            find(OsStr::new("no-such-program-x"), Some(OsStr::new("/bin"))),
            None
        );
    }
}
