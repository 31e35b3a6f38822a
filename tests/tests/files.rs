//! Item 5 of issue 2, files: paths the rules make remote are read in the target's
//! root (cat, Python, a C program with open/read/pread/lseek/fstat/opendir/readdir
//! and fopen/fgets, a byte-by-byte reader), writes stay local unless `--fs write`,
//! `--fs local` turns files off, `--fs-local` / `--fs-remote` override the rules,
//! and neither `..` nor a symlink leaves the target's root.

use std::path::Path;
use std::time::{Duration, Instant};

use graft_tests::{BIG_FILE_LEN, Bed, big_file_fnv};

fn hello(bed: &Bed) -> String {
    format!("hello from target {}\nsecond line\nthird line\n", bed.n)
}

#[test]
fn cat_reads_a_file_that_exists_only_in_the_target() {
    let bed = Bed::new();
    let out = bed.run(
        &[],
        &[
            "cat",
            &bed.remote("hello.txt"),
            &bed.remote("sub/nested.txt"),
        ],
    );
    let expected = format!("{}nested in target {}\n", hello(&bed), bed.n);
    assert_eq!(out.assert_success().stdout, expected);
}

#[test]
fn python_reads_lists_and_stats_remote_files() {
    let bed = Bed::new();
    let dir = bed.remote_dir.display().to_string();
    let out = bed.run_py(&[], "files.py", &[&dir]);
    let seen: serde_json::Value = serde_json::from_str(out.assert_success().out())
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"));
    assert_eq!(seen["text"], hello(&bed));
    assert_eq!(seen["lines"].as_array().map(Vec::len), Some(3));
    assert_eq!(seen["lines"][1], "second line\n");
    assert_eq!(
        seen["listdir"],
        serde_json::json!([
            "big.bin",
            "hello.txt",
            "hosts-link",
            "secret-link",
            "sub",
            "up"
        ])
    );
    assert_eq!(seen["big_size"], BIG_FILE_LEN);
    assert_eq!(seen["sub_is_dir"], true);
    assert_eq!(seen["missing_exists"], false);
    assert_eq!(seen["nested"], format!("nested in target {}\n", bed.n));
}

#[test]
fn c_program_reads_a_remote_file_with_open_read_lseek_pread_readv_mmap_and_fstat() {
    let bed = Bed::new();
    let files = bed.compile("files");
    let out = bed.run(&[], &[&files, "read", &bed.remote("hello.txt")]);
    let size = hello(&bed).len();
    assert_eq!(
        out.assert_success().lines(),
        [
            format!("size {size}"),
            format!("first hello from target {}", bed.n),
            "lseek6 [from ]".to_owned(),
            "pread0 [hello]".to_owned(),
            format!("end {size}"),
            "readv [hello| from]".to_owned(),
            "mmap [hello]".to_owned(),
        ]
    );
}

#[test]
fn c_program_stats_and_accesses_a_remote_file_with_stat_lstat_fstatat_statx_access() {
    let bed = Bed::new();
    let files = bed.compile("files");
    let out = bed.run(&[], &[&files, "stat", &bed.remote("big.bin")]);
    assert_eq!(
        out.assert_success().lines(),
        [
            format!("stat {BIG_FILE_LEN}"),
            "lstat-link 0".into(),
            format!("fstatat {BIG_FILE_LEN}"),
            format!("statx {BIG_FILE_LEN}"),
            "access 0".into()
        ]
    );
    let out = bed.run(&[], &[&files, "stat", &bed.remote("hosts-link")]);
    assert!(
        out.assert_success().lines().contains(&"lstat-link 1"),
        "{out}"
    );
}

#[test]
fn c_program_lists_a_remote_directory_with_opendir_and_readdir() {
    let bed = Bed::new();
    let files = bed.compile("files");
    let out = bed.run(&[], &[&files, "dir", &bed.remote_dir.display().to_string()]);
    let mut names = out.assert_success().lines();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "big.bin",
            "hello.txt",
            "hosts-link",
            "secret-link",
            "sub",
            "up"
        ]
    );
}

#[test]
fn c_program_reads_a_remote_file_with_fopen_and_fgets() {
    let bed = Bed::new();
    let files = bed.compile("files");
    let out = bed.run(&[], &[&files, "fgets", &bed.remote("hello.txt")]);
    let expected: Vec<String> = hello(&bed).lines().map(|l| format!("line: {l}")).collect();
    assert_eq!(out.assert_success().lines(), expected);
}

#[test]
fn byte_by_byte_reader_reads_a_large_remote_file_quickly() {
    let bed = Bed::new();
    let files = bed.compile("files");
    let started = Instant::now();
    let out = bed.run(&[], &[&files, "bytewise", &bed.remote("big.bin")]);
    let took = started.elapsed();
    assert_eq!(
        out.assert_success().out(),
        format!("bytes {BIG_FILE_LEN} fnv {:08x}", big_file_fnv())
    );
    // 3 Mi one-byte reads: a round trip each would take minutes.
    assert!(
        took < Duration::from_secs(20),
        "3 MiB byte by byte took {took:?}"
    );
}

#[test]
fn writes_stay_local_by_default() {
    let bed = Bed::new();
    let path = bed.remote("written.txt");
    let script = format!("echo local-write > {path}");
    bed.run(&[], &["sh", "-c", &script]).assert_success();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "local-write\n");
    assert!(
        !bed.in_target(&["test", "-e", &path]).success(),
        "the write reached the target"
    );
    // The remote files are still there, unchanged.
    let cat = bed.in_target(&["cat", &bed.remote("hello.txt")]);
    assert_eq!(cat.assert_success().stdout, hello(&bed));
}

#[test]
fn a_file_written_locally_is_read_back_locally_under_fs_read() {
    // Issue 15: under `--fs read` a write goes to this machine, and the
    // program's next open of the same path must find what it wrote, not the
    // target's copy (or ENOENT when the target has none).
    let bed = Bed::new();
    let fresh = bed.remote("fresh.txt");
    let hello_path = bed.remote("hello.txt");
    let script = format!(
        "p, q = {fresh:?}, {hello_path:?}\n\
         open(p, 'w').write('mine\\n')\n\
         print('fresh', open(p).read().strip())\n\
         open(q, 'w').write('local hello\\n')\n\
         print('hello', open(q).read().strip())\n\
         import os\n\
         print('size', os.stat(q).st_size)\n"
    );
    let out = bed.run(&[], &[graft_tests::python(), "-c", &script]);
    out.assert_success();
    assert!(out.stdout.contains("fresh mine\n"), "{out}");
    assert!(out.stdout.contains("hello local hello\n"), "{out}");
    assert!(out.stdout.contains("size 12\n"), "{out}");
    // The same with a shell's builtins (one process): `>` then `<`.
    let script = format!("echo shell-wrote > {fresh}; read x < {fresh}; echo \"got $x\"");
    let out = bed.run(&[], &["sh", "-c", &script]);
    assert!(out.stdout.contains("got shell-wrote"), "{out}");
    // The target's files are untouched, and other paths still read remotely.
    let cat = bed.in_target(&["cat", &hello_path]);
    assert_eq!(cat.assert_success().stdout, hello(&bed));
    assert!(!bed.in_target(&["test", "-e", &fresh]).success());
}

#[test]
fn fs_write_creates_files_in_the_target_root() {
    let bed = Bed::new();
    let path = bed.remote("created.txt");
    let script = format!("open({path:?}, 'w').write('written through graft\\n')");
    bed.run(&["--fs", "write"], &[graft_tests::python(), "-c", &script])
        .assert_success();
    let cat = bed.in_target(&["cat", &path]);
    assert_eq!(cat.assert_success().stdout, "written through graft\n");
    assert!(!Path::new(&path).exists(), "the write also landed locally");
}

#[test]
fn fs_write_overwrites_a_remote_file_in_place() {
    let bed = Bed::new();
    let path = bed.remote("sub/nested.txt");
    let script = format!("printf replaced > {path}");
    bed.run(&["--fs", "write"], &["sh", "-c", &script])
        .assert_success();
    let cat = bed.in_target(&["cat", &path]);
    assert_eq!(cat.assert_success().stdout, "replaced");
}

#[test]
fn fs_local_turns_remote_files_off() {
    let bed = Bed::new();
    let out = bed.run(&["--fs", "local"], &["cat", &bed.remote("hello.txt")]);
    assert!(!out.success(), "read a remote file with --fs local:\n{out}");
    assert!(!out.stdout.contains("hello from target"), "{out}");
}

#[test]
fn fs_local_regex_keeps_matching_paths_local() {
    let bed = Bed::new();
    let regex = format!("^{}/hello", bed.remote_dir.display());
    let out = bed.run(&["--fs-local", &regex], &["cat", &bed.remote("hello.txt")]);
    assert!(
        !out.success(),
        "{regex} did not keep hello.txt local:\n{out}"
    );
    let out = bed.run(
        &["--fs-local", &regex],
        &["cat", &bed.remote("sub/nested.txt")],
    );
    assert_eq!(
        out.assert_success().out(),
        format!("nested in target {}", bed.n)
    );
}

#[test]
fn fs_remote_regex_makes_a_default_local_path_remote() {
    let bed = Bed::new();
    let file = bed
        .tmp_remote_dir
        .join("tmp-remote.txt")
        .display()
        .to_string();
    let local = bed.run(&[], &["cat", &file]);
    assert!(!local.success(), "/tmp is local by default, yet:\n{local}");
    let regex = format!("^{}/", bed.tmp_remote_dir.display());
    let remote = bed.run(&["--fs-remote", &regex], &["cat", &file]);
    assert_eq!(
        remote.assert_success().out(),
        format!("tmp in target {}", bed.n)
    );
}

#[test]
fn absolute_symlink_resolves_inside_the_target_root() {
    let bed = Bed::new();
    // hosts-link -> /etc/hosts: the target's hosts file, not the host's.
    let out = bed.run(&[], &["cat", &bed.remote("hosts-link")]);
    assert!(
        out.assert_success()
            .stdout
            .contains("only-target.graft.test"),
        "{out}"
    );
}

#[test]
fn symlink_cannot_escape_the_target_root() {
    let bed = Bed::new();
    let secret = format!("host-secret {}", bed.n);
    let out = bed.run(&[], &["cat", &bed.remote("secret-link")]);
    assert!(
        !out.stdout.contains(&secret),
        "a symlink escaped the target's root:\n{out}"
    );
    assert!(!out.success(), "{out}");
    let through_up = format!(
        "{}/up{}/secret.txt",
        bed.remote_dir.display(),
        bed.hostonly_dir.display()
    );
    let out = bed.run(&[], &["cat", &through_up]);
    assert!(
        !out.stdout.contains(&secret),
        "a relative symlink escaped:\n{out}"
    );
    // `up` ends at the target's root: it leads to the target's own files.
    let hosts = format!("{}/up/etc/hosts", bed.remote_dir.display());
    let out = bed.run(&[], &["cat", &hosts]);
    assert!(
        out.assert_success()
            .stdout
            .contains("only-target.graft.test"),
        "{out}"
    );
}

#[test]
fn dotdot_cannot_escape_the_target_root() {
    let bed = Bed::new();
    let secret = format!("host-secret {}", bed.n);
    let dotdots = "/..".repeat(12);
    let path = format!(
        "{}{dotdots}{}/secret.txt",
        bed.remote_dir.display(),
        bed.hostonly_dir.display()
    );
    let files = bed.compile("files");
    let out = bed.run(&[], &[&files, "read", &path]);
    assert!(
        !out.stdout.contains(&secret),
        "`..` escaped the target's root:\n{out}"
    );
    assert!(!out.success(), "{out}");
    let hosts = format!("{}{dotdots}/etc/hosts", bed.remote_dir.display());
    let out = bed.run(&[], &["cat", &hosts]);
    assert!(
        out.assert_success()
            .stdout
            .contains("only-target.graft.test"),
        "{out}"
    );
}
