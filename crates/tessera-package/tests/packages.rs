//! Packing is deterministic; unpacking refuses hostile packages with a clear error and
//! leaves nothing behind.

use std::fs;
use std::io::Write;
use std::path::Path;

use tessera_core::Digest;
use tessera_package::{Limits, UnpackError, inspect, pack_dir, unpack, verify};

const MANIFEST: &str = "name: demo.echo\nversion: 0.1.0\nkind: task\nruntime: wasm\nentry: module.wasm\n";

fn module_dir(root: &Path) -> std::path::PathBuf {
    let dir = root.join("demo");
    fs::create_dir_all(dir.join("data/nested")).unwrap();
    fs::write(dir.join("module.yaml"), MANIFEST).unwrap();
    fs::write(dir.join("module.wasm"), b"\0asm fake but present").unwrap();
    fs::write(dir.join("data/nested/weights.bin"), vec![7u8; 10_000]).unwrap();
    fs::write(dir.join("README.md"), "# demo\n").unwrap();
    dir
}

#[test]
fn same_folder_same_bytes() {
    let t = tempfile::tempdir().unwrap();
    let dir = module_dir(t.path());
    let a = pack_dir(&dir, &Limits::default()).unwrap();
    let b = pack_dir(&dir, &Limits::default()).unwrap();
    assert_eq!(a.bytes, b.bytes);
    assert_eq!(a.digest, Digest::of(&a.bytes));
    assert!(a.digest.to_string().starts_with("b3:"));

    // A copy elsewhere, written in another order at another time, packs the same.
    let t2 = tempfile::tempdir().unwrap();
    let other = t2.path().join("elsewhere");
    fs::create_dir_all(other.join("data/nested")).unwrap();
    fs::write(other.join("README.md"), "# demo\n").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(other.join("data/nested/weights.bin"), vec![7u8; 10_000]).unwrap();
    fs::write(other.join("module.wasm"), b"\0asm fake but present").unwrap();
    fs::write(other.join("module.yaml"), MANIFEST).unwrap();
    // Build output and VCS data are never packed.
    fs::create_dir_all(other.join("target/debug")).unwrap();
    fs::write(other.join("target/debug/junk"), "x").unwrap();
    fs::create_dir_all(other.join(".git")).unwrap();
    fs::write(other.join(".git/HEAD"), "ref").unwrap();
    assert_eq!(pack_dir(&other, &Limits::default()).unwrap().digest, a.digest);
}

#[test]
fn one_byte_changes_the_digest() {
    let t = tempfile::tempdir().unwrap();
    let dir = module_dir(t.path());
    let a = pack_dir(&dir, &Limits::default()).unwrap();
    let mut w = fs::read(dir.join("data/nested/weights.bin")).unwrap();
    w[5000] = 8;
    fs::write(dir.join("data/nested/weights.bin"), w).unwrap();
    let b = pack_dir(&dir, &Limits::default()).unwrap();
    assert_ne!(a.digest, b.digest);
}

#[cfg(unix)]
#[test]
fn executable_bit_is_kept_and_counts() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let dir = module_dir(t.path());
    let a = pack_dir(&dir, &Limits::default()).unwrap();
    fs::set_permissions(dir.join("README.md"), fs::Permissions::from_mode(0o755)).unwrap();
    let b = pack_dir(&dir, &Limits::default()).unwrap();
    assert_ne!(a.digest, b.digest);
    let out = t.path().join("out");
    unpack(&b.bytes, &out, &Limits::default()).unwrap();
    assert_ne!(fs::metadata(out.join("README.md")).unwrap().permissions().mode() & 0o111, 0);
}

#[test]
fn round_trip_unpacks_every_file() {
    let t = tempfile::tempdir().unwrap();
    let dir = module_dir(t.path());
    let p = pack_dir(&dir, &Limits::default()).unwrap();
    verify(&p.bytes, &p.digest).unwrap();
    let info = inspect(&p.bytes, &Limits::default()).unwrap();
    assert_eq!(info.manifest.name.as_str(), "demo.echo");
    assert_eq!(info.files.len(), 4);
    let out = t.path().join("out");
    let info2 = unpack(&p.bytes, &out, &Limits::default()).unwrap();
    assert_eq!(info, info2);
    assert_eq!(fs::read(out.join("data/nested/weights.bin")).unwrap(), vec![7u8; 10_000]);
    assert_eq!(fs::read_to_string(out.join("module.yaml")).unwrap(), MANIFEST);
    // Unpacking never overwrites.
    assert!(matches!(unpack(&p.bytes, &out, &Limits::default()), Err(UnpackError::Io { .. })));
}

#[cfg(unix)]
#[test]
fn packing_refuses_symlinks_and_missing_parts() {
    let t = tempfile::tempdir().unwrap();
    let dir = module_dir(t.path());
    std::os::unix::fs::symlink("/etc/passwd", dir.join("passwd")).unwrap();
    let e = pack_dir(&dir, &Limits::default()).unwrap_err().to_string();
    assert!(e.contains("passwd") && e.contains("symlink"), "{e}");
    fs::remove_file(dir.join("passwd")).unwrap();

    fs::remove_file(dir.join("module.wasm")).unwrap();
    let e = pack_dir(&dir, &Limits::default()).unwrap_err().to_string();
    assert!(e.contains("module.wasm") && e.contains("tessera module build"), "{e}");

    let e = pack_dir(&t.path().join("nowhere"), &Limits::default()).unwrap_err().to_string();
    assert!(e.contains("module.yaml"), "{e}");

    fs::write(dir.join("module.yaml"), "name: Bad Name\n").unwrap();
    let e = pack_dir(&dir, &Limits::default()).unwrap_err().to_string();
    assert!(e.contains("name"), "{e}");
}

// ---- hostile archives, built byte by byte ----

enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(&'static str),
    HardLink(&'static str),
    CharDevice,
    Fifo,
}

/// A tar archive whose entry names are written raw, so they can say anything.
fn raw_tar(entries: &[(&[u8], Kind)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind) in entries {
        let mut h = tar::Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name);
        }
        h.set_mode(0o644);
        h.set_mtime(0);
        let data: &[u8] = match kind {
            Kind::File(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                d
            }
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                &[]
            }
            Kind::Symlink(t) | Kind::HardLink(t) => {
                h.set_entry_type(if matches!(kind, Kind::Symlink(_)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_size(0);
                h.as_gnu_mut().unwrap().linkname[..t.len()].copy_from_slice(t.as_bytes());
                &[]
            }
            Kind::CharDevice => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_size(0);
                &[]
            }
            Kind::Fifo => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_size(0);
                &[]
            }
        };
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn zst(tar: &[u8]) -> Vec<u8> {
    zstd::encode_all(tar, 3).unwrap()
}

fn good_entries() -> Vec<(&'static [u8], Kind)> {
    vec![(b"module.yaml", Kind::File(MANIFEST.as_bytes().to_vec())), (b"module.wasm", Kind::File(b"\0asm".to_vec()))]
}

fn refused(entries: Vec<(&[u8], Kind)>) -> String {
    let bytes = zst(&raw_tar(&entries));
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("out");
    let e = unpack(&bytes, &dest, &Limits::default()).expect_err("hostile package accepted");
    assert!(!dest.exists(), "a refused package left files behind");
    assert_eq!(fs::read_dir(t.path()).unwrap().count(), 0, "staging left behind");
    assert!(inspect(&bytes, &Limits::default()).is_err());
    e.to_string()
}

#[test]
fn well_formed_raw_archive_is_accepted() {
    let bytes = zst(&raw_tar(&good_entries()));
    let t = tempfile::tempdir().unwrap();
    unpack(&bytes, &t.path().join("out"), &Limits::default()).unwrap();
}

#[test]
fn refuses_path_traversal() {
    let mut e = good_entries();
    e.push((b"../evil.sh", Kind::File(b"rm -rf".to_vec())));
    let msg = refused(e);
    assert!(msg.contains("../evil.sh") && msg.contains(".."), "{msg}");

    let mut e = good_entries();
    e.push((b"data/../../evil.sh", Kind::File(b"x".to_vec())));
    assert!(refused(e).contains("data/../../evil.sh"));
}

#[test]
fn refuses_absolute_paths() {
    let mut e = good_entries();
    e.push((b"/etc/cron.d/evil", Kind::File(b"x".to_vec())));
    let msg = refused(e);
    assert!(msg.contains("/etc/cron.d/evil") && msg.contains("absolute"), "{msg}");
}

#[test]
fn refuses_links_and_devices() {
    let cases: Vec<(Kind, &str)> = vec![
        (Kind::Symlink("/etc/passwd"), "symlink"),
        (Kind::HardLink("/etc/passwd"), "hard link"),
        (Kind::CharDevice, "device"),
        (Kind::Fifo, "FIFO"),
    ];
    for (kind, word) in cases {
        let mut e = good_entries();
        e.push((b"sneaky", kind));
        let msg = refused(e);
        assert!(msg.contains("sneaky") && msg.contains(word), "{msg}");
    }
}

#[test]
fn refuses_duplicates_and_file_dir_clashes() {
    let mut e = good_entries();
    e.push((b"module.wasm", Kind::File(b"other".to_vec())));
    assert!(refused(e).contains("twice"));

    let mut e = good_entries();
    e.push((b"data", Kind::File(b"x".to_vec())));
    e.push((b"data/x", Kind::File(b"y".to_vec())));
    assert!(refused(e).contains("is a file"));

    let mut e = good_entries();
    e.push((b"d/", Kind::Dir));
    e.push((b"d", Kind::File(b"y".to_vec())));
    assert!(refused(e).contains("twice"));
}

#[test]
fn refuses_non_utf8_names() {
    let mut e = good_entries();
    e.push((b"caf\xe9", Kind::File(b"x".to_vec())));
    assert!(refused(e).contains("UTF-8"));
}

#[test]
fn refuses_missing_or_bad_manifest_and_entry() {
    assert!(refused(vec![(b"module.wasm", Kind::File(b"x".to_vec()))]).contains("no module.yaml"));
    let msg = refused(vec![(b"module.yaml", Kind::File(b"name: x\nversion: nope\n".to_vec()))]);
    assert!(msg.contains("version"), "{msg}");
    let msg = refused(vec![(b"module.yaml", Kind::File(MANIFEST.as_bytes().to_vec()))]);
    assert!(msg.contains("module.wasm") && msg.contains("not in the module"), "{msg}");
}

#[test]
fn refuses_too_many_entries() {
    let names: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
    let mut e = good_entries();
    for n in &names {
        e.push((n.as_bytes(), Kind::File(vec![1])));
    }
    let bytes = zst(&raw_tar(&e));
    let limits = Limits { max_entries: 10, ..Limits::default() };
    let msg = inspect(&bytes, &limits).unwrap_err().to_string();
    assert!(msg.contains("more than 10 entries"), "{msg}");
}

#[test]
fn refuses_truncated_archives() {
    let t = tempfile::tempdir().unwrap();
    let dir = module_dir(t.path());
    let p = pack_dir(&dir, &Limits::default()).unwrap();
    for cut in [1, 4, p.bytes.len() / 2, p.bytes.len() - 1] {
        let e = inspect(&p.bytes[..cut], &Limits::default()).expect_err("truncated package accepted");
        assert!(matches!(e, UnpackError::Malformed(_)), "cut at {cut}: {e}");
    }
    // Trailing garbage after the frame.
    let mut extra = p.bytes.clone();
    extra.extend_from_slice(b"garbage");
    assert!(inspect(&extra, &Limits::default()).is_err());
    // Not zstd at all; empty.
    assert!(inspect(b"PK\x03\x04 a zip file", &Limits::default()).is_err());
    assert!(inspect(b"", &Limits::default()).is_err());
    // A truncated tar inside a valid zstd frame.
    let tar = raw_tar(&good_entries());
    let cut = zst(&tar[..700]);
    assert!(inspect(&cut, &Limits::default()).is_err());
}

#[test]
fn refuses_digest_mismatch() {
    let t = tempfile::tempdir().unwrap();
    let dir = module_dir(t.path());
    let p = pack_dir(&dir, &Limits::default()).unwrap();
    let mut tampered = p.bytes.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let e = verify(&tampered, &p.digest).unwrap_err();
    assert!(matches!(e, UnpackError::DigestMismatch { .. }));
    assert!(e.to_string().contains(&p.digest.to_string()));
}

/// A zstd frame of RLE blocks: `blocks` x 128 KiB of `byte`, a few bytes each.
fn rle_frame(byte: u8, blocks: usize) -> Vec<u8> {
    let mut f = vec![0x28, 0xB5, 0x2F, 0xFD];
    // Frame header descriptor: no content size, single segment off, no checksum, no dict.
    f.push(0x00);
    // Window descriptor: 2^(10+7) = 128 KiB.
    f.push(7 << 3);
    const BLOCK: u32 = 128 * 1024;
    for i in 0..blocks {
        let last = u32::from(i + 1 == blocks);
        let header = last | (1 << 1) | (BLOCK << 3);
        f.extend_from_slice(&header.to_le_bytes()[..3]);
        f.push(byte);
    }
    f
}

#[test]
fn refuses_decompression_bombs() {
    // A well-formed tiny package followed by a second frame of 1.1 GiB of zeros, in 36 KiB.
    let mut bomb = zst(&raw_tar(&good_entries()));
    bomb.extend_from_slice(&rle_frame(0, 9 * 1024));
    assert!(bomb.len() < 64 * 1024);
    let e = inspect(&bomb, &Limits::default()).unwrap_err();
    assert!(matches!(e, UnpackError::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("over the limit"), "{e}");

    // One entry that claims more than the per-file limit.
    let small = Limits { max_entry_bytes: 1 << 20, ..Limits::default() };
    let mut e = good_entries();
    e.push((b"big.bin", Kind::File(vec![0u8; 2 << 20])));
    let msg = inspect(&zst(&raw_tar(&e)), &small).unwrap_err().to_string();
    assert!(msg.contains("big.bin") && msg.contains("per-file limit"), "{msg}");

    // Many entries whose sum is over the total limit.
    let small = Limits { max_total_bytes: 1 << 20, ..Limits::default() };
    let mut e = good_entries();
    e.push((b"a.bin", Kind::File(vec![0u8; 600 << 10])));
    e.push((b"b.bin", Kind::File(vec![0u8; 600 << 10])));
    assert!(matches!(inspect(&zst(&raw_tar(&e)), &small), Err(UnpackError::TooLarge { .. })));

    // The compressed size itself.
    let tiny = Limits { max_package_bytes: 10, ..Limits::default() };
    assert!(matches!(inspect(&zst(&raw_tar(&good_entries())), &tiny), Err(UnpackError::TooLarge { .. })));
}

#[test]
fn unpack_leaves_nothing_when_an_entry_fails_midway() {
    let mut e = good_entries();
    e.push((b"ok.txt", Kind::File(b"fine".to_vec())));
    e.push((b"../escape", Kind::File(b"x".to_vec())));
    let bytes = zst(&raw_tar(&e));
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("out");
    unpack(&bytes, &dest, &Limits::default()).unwrap_err();
    assert!(!dest.exists());
    assert!(!t.path().join("escape").exists());
    let mut f = fs::File::create(t.path().join("marker")).unwrap();
    f.write_all(b"still here").unwrap();
    assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1);
}

/// `.tesseraignore` (gitignore syntax) keeps files out of the package; `module.yaml` always
/// goes in, and ignoring the entry is an error that names it.
#[test]
fn the_ignore_file_keeps_files_out() {
    let t = tempfile::tempdir().unwrap();
    let dir = module_dir(t.path());
    fs::create_dir_all(dir.join("src")).unwrap();
    fs::write(dir.join("src/secret.rs"), "fn main() {}").unwrap();
    fs::write(dir.join("notes.tmp"), "x").unwrap();
    fs::write(dir.join("data/keep.tmp"), "x").unwrap();
    fs::write(dir.join(".tesseraignore"), "# not in the package\nsrc/\n*.tmp\n!data/keep.tmp\nmodule.yaml\n").unwrap();
    let packed = pack_dir(&dir, &Limits::default()).unwrap();
    let files: Vec<&str> = packed.info.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        files,
        [".tesseraignore", "README.md", "data/keep.tmp", "data/nested/weights.bin", "module.wasm", "module.yaml"]
    );
    // The package unpacks with exactly those files.
    let out = t.path().join("out");
    unpack(&packed.bytes, &out, &Limits::default()).unwrap();
    assert!(!out.join("src").exists() && !out.join("notes.tmp").exists());

    fs::write(dir.join(".tesseraignore"), "*.wasm\n").unwrap();
    let e = pack_dir(&dir, &Limits::default()).unwrap_err().to_string();
    assert!(e.contains("module.wasm"), "{e}");
}

/// A development build carries a pre-release version named after the folder's contents:
/// the same folder, the same version and bytes; a change, another version.
#[test]
fn development_builds_are_named_by_their_contents() {
    let t = tempfile::tempdir().unwrap();
    let dir = module_dir(t.path());
    let plain = tessera_package::pack_dir(&dir, &Limits::default()).unwrap();
    let a = tessera_package::pack_dir_dev(&dir, &Limits::default()).unwrap();
    let b = tessera_package::pack_dir_dev(&dir, &Limits::default()).unwrap();
    assert_eq!(a.bytes, b.bytes);
    let v = a.info.manifest.version.to_string();
    assert_eq!(v, format!("0.1.0-dev.{}", &plain.digest.hex()[..12]));
    let unpacked = inspect(&a.bytes, &Limits::default()).unwrap();
    assert_eq!(unpacked.manifest.version.to_string(), v, "the packed module.yaml says so");
    assert_eq!(fs::read_to_string(dir.join("module.yaml")).unwrap(), MANIFEST, "the folder is untouched");
    fs::write(dir.join("README.md"), "# changed\n").unwrap();
    let c = tessera_package::pack_dir_dev(&dir, &Limits::default()).unwrap();
    assert_ne!(c.info.manifest.version.to_string(), v);
}
