use super::flatten::{is_opaque, is_whiteout};
use super::*;
use berth_testkit::{header, tar_of, Entry as E};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;

fn opts() -> Options {
    Options::for_caller()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("berth-unpack-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tar of one extension record of `size` bytes (zeros, or `record`) and a file after it.
fn with_record(kind: tar::EntryType, size: u64, record: &[u8]) -> Vec<u8> {
    tar_of(&[E::Record(kind, size, record), E::File("after", b"x", 0o644)])
}

#[test]
fn extension_records_over_the_cap_are_refused_before_they_are_read() {
    for kind in [tar::EntryType::GNULongName, tar::EntryType::GNULongLink, tar::EntryType::XHeader, tar::EntryType::XGlobalHeader] {
        let d = tmp("record-cap");
        let size = MAX_HEADER_RECORD + 1;
        let err = unpack(&with_record(kind, size, b"")[..], &d, &opts()).unwrap_err().to_string();
        assert_eq!(err, format!("the layer has a tar header record of {size} bytes, larger than berth's cap of 1 MiB (a broken or hostile layer)"), "{kind:?}");
    }
    // The cap itself, and what real images carry, pass.
    let d = tmp("record-ok");
    let mut name = "n/".repeat(200).into_bytes();
    name.extend(b"long\0");
    unpack(&with_record(tar::EntryType::GNULongName, name.len() as u64, &name)[..], &d, &opts()).unwrap();
    assert!(d.join("n/".repeat(200)).join("long").exists() && !d.join("after").exists(), "the long name names the entry after it");
    let d = tmp("record-at-cap");
    unpack(&with_record(tar::EntryType::XGlobalHeader, MAX_HEADER_RECORD, b"")[..], &d, &opts()).unwrap();
    assert!(d.join("after").exists());
}

#[test]
fn the_guard_follows_pax_sizes_and_sparse_extension_blocks_as_the_reader_does() {
    // A PAX size record makes the next entry longer than its header says; the
    // guard must skip exactly that much, then refuse the oversized record behind it.
    let body = vec![7u8; 3000];
    let mut big = header(tar::EntryType::Regular, 0o644, 100);
    big.set_path("big").unwrap();
    let t = tar_of(&[
        E::Pax(&[("size", b"3000")]),
        E::Raw(&big, &body),
        E::Record(tar::EntryType::GNULongName, MAX_HEADER_RECORD + 1, b""),
        E::File("after", b"x", 0o644),
    ]);
    let d = tmp("pax-size");
    let err = unpack(&t[..], &d, &opts()).unwrap_err();
    assert!(matches!(err, UnpackError::HeaderTooLarge { .. }), "{err}");
    assert_eq!(std::fs::metadata(d.join("big")).unwrap().len(), 3000);

    let mut guard = Guard::new(&[][..]);
    let mut sparse = header(tar::EntryType::GNUSparse, 0o644, 512);
    sparse.as_gnu_mut().unwrap().isextended[0] = 1;
    sparse.set_cksum();
    let mut ext = [0u8; 512];
    ext[504] = 0;
    guard.watch(sparse.as_bytes()).unwrap();
    guard.watch(&ext).unwrap();
    guard.watch(&[1u8; 512]).unwrap();
    let big = with_record(tar::EntryType::XHeader, MAX_HEADER_RECORD + 1, b"");
    assert_eq!(guard.watch(&big[..512]), Err(MAX_HEADER_RECORD + 1), "the block after the sparse data is a header");
}

#[test]
fn the_budget_caps_bytes_and_entries_across_layers() {
    let budget = Budget::new(10, "10", 3);
    let (l1, l2) = (tmp("budget-1"), tmp("budget-2"));
    unpack_within(&tar_of(&[E::File("a", b"12345", 0o644), E::File("b", b"", 0o644)])[..], &l1, &opts(), &budget).unwrap();
    let err = unpack_within(&tar_of(&[E::File("c", b"123456", 0o644)])[..], &l2, &opts(), &budget).unwrap_err();
    assert_eq!(err.to_string(), "the image unpacks to more than max_image_size (10); raise max_image_size in the admin config if it is meant to be this large");
    assert!(err.is_refused() && !err.is_no_space());
    let budget = Budget::new(u64::MAX, "64G", 2);
    let err = unpack_within(&tar_of(&[E::Dir("d/", 0o755), E::File("d/a", b"", 0o644), E::File("d/b", b"", 0o644)])[..], &tmp("budget-3"), &opts(), &budget).unwrap_err();
    assert!(matches!(err, UnpackError::TooManyFiles { limit: 2 }), "{err}");
}

#[test]
fn writes_files_dirs_links_and_overlay_whiteouts() {
    let d = tmp("basic");
    let t = tar_of(&[
        E::Dir("./", 0o755),
        E::Dir("etc/", 0o755),
        E::File("etc/a", b"hello", 0o4755),
        E::HardLink("etc/b", "etc/a"),
        E::Symlink("etc/s", "/etc/a"),
        E::Fifo("etc/f", 0o644),
        E::Char("etc/tty", 0, 0),
        E::File("etc/.wh.gone", b"", 0o644),
        E::Dir("ro/", 0o555),
        E::File("ro/x", b"x", 0o444),
        E::File("ro/.wh..wh..opq", b"", 0o644),
        E::HardLink("new", "lower/file"),
    ]);
    let out = unpack(&t[..], &d, &opts()).unwrap();
    let a = std::fs::metadata(d.join("etc/a")).unwrap();
    assert_eq!(std::fs::read(d.join("etc/a")).unwrap(), b"hello");
    assert_eq!(a.mode() & 0o7777, 0o4755);
    assert_eq!(a.ino(), std::fs::metadata(d.join("etc/b")).unwrap().ino());
    assert_eq!(std::fs::read_link(d.join("etc/s")).unwrap(), Path::new("/etc/a"));
    assert!(std::fs::symlink_metadata(d.join("etc/f")).unwrap().file_type().is_fifo());
    assert!(std::fs::symlink_metadata(d.join("etc/tty")).is_err(), "device nodes are dropped");
    assert!(is_whiteout(&std::fs::symlink_metadata(d.join("etc/gone")).unwrap()));
    assert!(std::fs::symlink_metadata(d.join("etc/.wh.gone")).is_err());
    assert!(is_opaque(&d.join("ro")));
    assert_eq!(std::fs::metadata(d.join("ro")).unwrap().mode() & 0o7777, 0o555);
    assert_eq!(out.external_links, vec![("new".to_string(), "lower/file".to_string())]);
    let _ = std::fs::set_permissions(d.join("ro"), std::fs::Permissions::from_mode(0o755));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn refuses_every_path_escape() {
    let outside = tmp("outside");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dotdot", tar_of(&[E::File("../escape", b"x", 0o644)])),
        ("dotdot-inner", tar_of(&[E::Dir("a/", 0o755), E::File("a/../../escape", b"x", 0o644)])),
        ("absolute", tar_of(&[E::File("/tmp/escape", b"x", 0o644)])),
        ("symlink-parent", tar_of(&[E::Symlink("l", outside.to_str().unwrap()), E::File("l/escape", b"x", 0o644)])),
        ("symlink-dotdot", tar_of(&[E::Symlink("l", "../../../../"), E::File("l/escape", b"x", 0o644)])),
        ("hardlink-out", tar_of(&[E::HardLink("h", "../../etc/passwd")])),
        ("hardlink-abs", tar_of(&[E::HardLink("h", "/etc/passwd")])),
        ("hardlink-via-symlink", tar_of(&[E::Symlink("l", "/etc"), E::HardLink("h", "l/passwd")])),
        ("whiteout-dotdot", tar_of(&[E::File(".wh..", b"", 0o644)])),
    ];
    for (name, t) in cases {
        let d = tmp(name);
        let err = unpack(&t[..], &d, &opts()).expect_err(name);
        assert!(matches!(err, UnpackError::Hostile { .. }), "{name}: {err}");
        assert!(err.to_string().starts_with("hostile layer: entry '"), "{name}: {err}");
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none(), "{name} wrote outside");
        assert!(!Path::new("/tmp/escape").exists() && !d.parent().unwrap().join("escape").exists(), "{name}");
        std::fs::remove_dir_all(&d).unwrap();
    }
    std::fs::remove_dir_all(&outside).unwrap();
}

#[test]
fn whiteouts_opaque_markers_and_dirs_never_act_through_a_symlink() {
    let outside = tmp("outside-wh");
    std::fs::write(outside.join("victim"), b"keep").unwrap();
    let target = outside.to_str().unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("whiteout-via-symlink", tar_of(&[E::Symlink("l", target), E::File("l/.wh.victim", b"", 0o644)])),
        ("opaque-via-symlink", tar_of(&[E::Symlink("l", target), E::File("l/.wh..wh..opq", b"", 0o644)])),
        ("dir-via-symlink", tar_of(&[E::Symlink("l", target), E::Dir("l/sub/", 0o755)])),
        ("fifo-via-symlink", tar_of(&[E::Symlink("l", target), E::Fifo("l/pipe", 0o644)])),
        ("symlink-via-symlink", tar_of(&[E::Symlink("l", target), E::Symlink("l/s", "/etc/shadow")])),
        ("hardlink-into-symlink-dir", tar_of(&[E::File("f", b"x", 0o644), E::Symlink("l", target), E::HardLink("l/h", "f")])),
    ];
    for (name, t) in cases {
        let d = tmp(name);
        let err = unpack(&t[..], &d, &opts()).expect_err(name);
        assert!(matches!(err, UnpackError::Hostile { .. }), "{name}: {err}");
        let left: Vec<_> = std::fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["victim"], "{name} touched the symlink's target");
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep", "{name}");
        assert!(!is_whiteout(&std::fs::symlink_metadata(outside.join("victim")).unwrap()) && !is_opaque(&outside), "{name}");
        std::fs::remove_dir_all(&d).unwrap();
    }
    std::fs::remove_dir_all(&outside).unwrap();
}

#[test]
fn a_symlink_replaced_by_a_directory_is_written_inside_the_layer() {
    let outside = tmp("outside-replaced");
    let d = tmp("replaced");
    let t = tar_of(&[E::Symlink("l", outside.to_str().unwrap()), E::Dir("l/", 0o755), E::File("l/x", b"in", 0o644), E::Symlink("m", "/etc"), E::File("m", b"file", 0o644)]);
    unpack(&t[..], &d, &opts()).unwrap();
    assert!(std::fs::symlink_metadata(d.join("l")).unwrap().is_dir());
    assert_eq!(std::fs::read(d.join("l/x")).unwrap(), b"in");
    assert_eq!(std::fs::read(d.join("m")).unwrap(), b"file", "a file replaces the symlink, not its target");
    assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
    std::fs::remove_dir_all(&d).unwrap();
    std::fs::remove_dir_all(&outside).unwrap();
}

#[test]
fn device_nodes_are_dropped_whatever_their_kind() {
    let d = tmp("devices");
    let t = tar_of(&[E::Block("sda", 8, 0), E::Char("mem", 1, 1), E::Char("kmsg", 1, 11)]);
    unpack(&t[..], &d, &opts()).unwrap();
    assert!(std::fs::read_dir(&d).unwrap().next().is_none(), "no device node may come from an image");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn very_long_paths_stay_inside_and_overlong_names_fail_cleanly() {
    let d = tmp("long");
    // 80 levels of 60-byte names: 4.9 KB, beyond PATH_MAX, fine component by component.
    let deep: String = (0..80).map(|i| format!("{i:0>60}/")).collect();
    unpack(&tar_of(&[E::File(&format!("{deep}leaf"), b"deep", 0o644)])[..], &d, &opts()).unwrap();
    let mut fd = rustix::fs::open(&d, DIR_FLAGS, Mode::empty()).unwrap();
    for c in deep.split('/').filter(|c| !c.is_empty()) {
        fd = rustix::fs::openat(&fd, c, DIR_FLAGS, Mode::empty()).unwrap();
    }
    let leaf = rustix::fs::openat(&fd, "leaf", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).unwrap();
    let mut text = String::new();
    std::fs::File::from(leaf).read_to_string(&mut text).unwrap();
    assert_eq!(text, "deep");
    std::fs::remove_dir_all(&d).unwrap();

    let d = tmp("overlong");
    let err = unpack(&tar_of(&[E::File(&"n".repeat(300), b"", 0o644)])[..], &d, &opts()).unwrap_err();
    assert!(err.to_string().contains("File name too long"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn hard_links_to_lower_layers_never_follow_a_lower_symlink_out() {
    let base = tmp("lower-symlink");
    let (l1, l2) = (base.join("l1"), base.join("l2"));
    std::fs::create_dir(&l1).unwrap();
    std::fs::create_dir(&l2).unwrap();
    unpack(&tar_of(&[E::Symlink("etc", "/etc"), E::Symlink("up", "../../..")])[..], &l1, &opts()).unwrap();
    for (name, target) in [("passwd-link", "etc/passwd"), ("up-link", "up/etc/passwd")] {
        let ext = unpack(&tar_of(&[E::HardLink(name, target)])[..], &l2, &opts()).unwrap();
        assert_eq!(ext.external_links.len(), 1, "{name}");
        let err = link_from_lowers(&l2, &[l1.clone()], &ext.external_links, &opts()).unwrap_err();
        assert!(matches!(err, UnpackError::Hostile { .. }), "{name}: {err}");
        assert!(std::fs::symlink_metadata(l2.join(name)).is_err(), "{name}");
    }
    assert!(!l2.join("etc").exists(), "nothing of the host's /etc was copied up");
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn rejects_forged_overlay_xattrs_and_garbage() {
    let d = tmp("garbage");
    let err = unpack(&b"this is not a tar archive at all, just text padding it out"[..], &d, &opts());
    // A short non-tar stream reads as an empty archive or an error; either way nothing is written.
    assert!(err.is_err() || std::fs::read_dir(&d).unwrap().next().is_none());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn lower_hard_links_are_copied_up_and_layers_flatten_like_applying_them() {
    let base = tmp("flatten");
    let (l1, l2, l3, out) = (base.join("l1"), base.join("l2"), base.join("l3"), base.join("out"));
    for p in [&l1, &l2, &l3, &out] {
        std::fs::create_dir(p).unwrap();
    }
    unpack(
        &tar_of(&[
            E::Dir("d/", 0o755),
            E::File("d/keep", b"k", 0o644),
            E::File("d/old", b"o", 0o644),
            E::Dir("opq/", 0o700),
            E::File("opq/hidden", b"h", 0o644),
            E::File("bin", b"b", 0o755),
            E::Symlink("link", "bin"),
        ])[..],
        &l1,
        &opts(),
    )
    .unwrap();
    unpack(&tar_of(&[E::Dir("d/", 0o755), E::File("d/.wh.old", b"", 0o644), E::Dir("opq/", 0o750), E::File("opq/.wh..wh..opq", b"", 0o644), E::File("opq/new", b"n", 0o600)])[..], &l2, &opts()).unwrap();
    let ext = unpack(&tar_of(&[E::Dir("x/", 0o755), E::HardLink("x/bin2", "bin")])[..], &l3, &opts()).unwrap();
    assert_eq!(ext.external_links.len(), 1);
    link_from_lowers(&l3, &[l1.clone(), l2.clone()], &ext.external_links, &opts()).unwrap();
    assert_eq!(std::fs::metadata(l3.join("bin")).unwrap().ino(), std::fs::metadata(l3.join("x/bin2")).unwrap().ino());
    flatten(&[l1, l2, l3], &out, &opts()).unwrap();
    assert_eq!(std::fs::read(out.join("d/keep")).unwrap(), b"k");
    assert!(!out.join("d/old").exists());
    assert!(!out.join("opq/hidden").exists());
    assert_eq!(std::fs::read(out.join("opq/new")).unwrap(), b"n");
    assert_eq!(std::fs::metadata(out.join("opq")).unwrap().mode() & 0o7777, 0o750);
    let (a, b) = (std::fs::metadata(out.join("bin")).unwrap(), std::fs::metadata(out.join("x/bin2")).unwrap());
    assert_eq!((a.ino(), a.nlink(), a.mode() & 0o777), (b.ino(), 2, 0o755));
    assert_eq!(std::fs::read_link(out.join("link")).unwrap(), Path::new("bin"));
    std::fs::remove_dir_all(&base).unwrap();
}
