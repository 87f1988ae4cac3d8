//! The BPF filesystem: where tcpguard pins its maps, programs and links, which directory it
//! accepts for them, and how they are taken down again, also from a process other than the
//! daemon that pinned them. Only tcpguard's own pins are ever removed.

use std::{
    ffi::CString,
    fs, io,
    os::unix::{
        ffi::OsStrExt as _,
        fs::{DirBuilderExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use tcpguard_common::{PROGRAMS, maps};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Pin names: a link's prefix is followed by the interface (the XDP link's by its mode first),
/// a program's by its name.
pub const XDP_LINK_PREFIX: &str = "link_xdp_";
pub const TC_LINK_PREFIX: &str = "link_tc_";
pub const REQSK_LINK_PREFIX: &str = "link_reqsk_";
const LINK_PREFIXES: [&str; 3] = [XDP_LINK_PREFIX, TC_LINK_PREFIX, REQSK_LINK_PREFIX];
const PROGRAM_PREFIX: &str = "prog_";

/// The pin name of the program `name`.
pub fn program_pin(name: &str) -> String {
    format!("{PROGRAM_PREFIX}{name}")
}

/// Maps that earlier versions of tcpguard pinned and this one no longer has: the flow map of
/// both families before each had its own, the interface's MAC before the protected ports'
/// entries held it, and the protected ports before they became global data each load has to
/// itself ([`tcpguard_common::PortTable`]). Still tcpguard's pins: loading removes them, and so
/// does `detach`.
pub const RETIRED_MAPS: [&str; 3] = ["FLOWS", "INTERFACE", "PROTECTED_PORTS"];

/// Whether `name` is one tcpguard pins under: a map, a program or a link of its own.
pub fn is_own_pin(name: &str) -> bool {
    maps::ALL.contains(&name)
        || RETIRED_MAPS.contains(&name)
        || name == maps::REQSK_RESULTS
        || name
            .strip_prefix(PROGRAM_PREFIX)
            .is_some_and(|program| PROGRAMS.contains(&program))
        || is_own_link(name)
        || name.starts_with(crate::tc::MARKER_PREFIX)
}

fn is_own_link(name: &str) -> bool {
    LINK_PREFIXES
        .iter()
        .any(|prefix| name.len() > prefix.len() && name.starts_with(prefix))
}

/// Whether `dir` lies on a BPF filesystem.
pub fn is_bpffs(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain old data; path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(path.as_ptr(), &mut stat) }) == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

#[derive(Debug, thiserror::Error)]
pub enum PinDirError {
    #[error(
        "pin_dir {dir:?} is not on a BPF filesystem; pins go in a directory under one, such as /sys/fs/bpf/tcpguard (`mount -t bpf bpf /sys/fs/bpf` mounts one), or set pin_dir = \"\" to pin nothing"
    )]
    NotBpffs { dir: PathBuf },
    #[error(
        "pin_dir {dir:?} is the root of a BPF filesystem; tcpguard pins in a directory of its own under it, such as {dir:?}/tcpguard"
    )]
    FilesystemRoot { dir: PathBuf },
    #[error(
        "pin_dir {dir:?} is not a directory (a symbolic link or a file); tcpguard pins only in a directory of its own"
    )]
    NotDirectory { dir: PathBuf },
    #[error(
        "pin_dir {dir:?} belongs to uid {uid}; it must belong to root or to the user tcpguard runs as, since whoever owns it can remove the pins and take protection down"
    )]
    Owner { dir: PathBuf, uid: u32 },
    #[error(
        "pin_dir {dir:?} is writable by group or others (mode {mode:o}), who could remove the pins and take protection down; `chmod go-w` it"
    )]
    Writable { dir: PathBuf, mode: u32 },
    #[error("pinning under {dir}: {source}")]
    Create { dir: PathBuf, source: io::Error },
    #[error("removing {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
}

/// Checks that `dir` can hold tcpguard's pins: a directory (or a name for one) under a BPF
/// filesystem, not that filesystem's root, owned by root or by the user tcpguard runs as (or
/// the `tcpguard` system user of the package), and writable by nobody else. Creates nothing.
pub fn check_pin_dir(dir: &Path) -> Result<(), PinDirError> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let parent = dir.parent().unwrap_or(Path::new("/"));
            if !is_bpffs(parent) {
                return Err(PinDirError::NotBpffs {
                    dir: dir.to_owned(),
                });
            }
            return Ok(());
        }
        Err(source) => {
            return Err(PinDirError::Create {
                dir: dir.to_owned(),
                source,
            });
        }
    };
    if !meta.is_dir() {
        return Err(PinDirError::NotDirectory {
            dir: dir.to_owned(),
        });
    }
    if !is_bpffs(dir) {
        return Err(PinDirError::NotBpffs {
            dir: dir.to_owned(),
        });
    }
    if is_bpffs_root(dir) {
        return Err(PinDirError::FilesystemRoot {
            dir: dir.to_owned(),
        });
    }
    if !allowed_owners().contains(&meta.uid()) {
        return Err(PinDirError::Owner {
            dir: dir.to_owned(),
            uid: meta.uid(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(PinDirError::Writable {
            dir: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Makes `dir`, where pins go (mode 0700), unless it is there; either way it must pass
/// [`check_pin_dir`], also when another process made it between the check and the making.
pub fn prepare_pin_dir(dir: &Path) -> Result<(), PinDirError> {
    check_pin_dir(dir)?;
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(PinDirError::Create {
                dir: dir.to_owned(),
                source,
            });
        }
    }
    check_pin_dir(dir)
}

/// Who may own a pin directory: root, the user this process runs as, and the package's
/// `tcpguard` system user (so that `tcpguard check-config` run by root accepts the directory
/// the service made).
fn allowed_owners() -> Vec<u32> {
    let mut owners = vec![0, nix::unistd::geteuid().as_raw()];
    if let Ok(Some(user)) = nix::unistd::User::from_name("tcpguard") {
        owners.push(user.uid.as_raw());
    }
    owners
}

/// Whether `dir` is where a BPF filesystem is mounted with its root (not a bind mount of a
/// directory inside one, which is how the systemd unit hands the service its pin directory).
fn is_bpffs_root(dir: &Path) -> bool {
    mount_at(dir).is_some_and(|mount| mount.root == "/" && mount.fstype == "bpf")
}

/// What is mounted at `dir`, if anything.
struct Mount {
    /// The directory of the mounted filesystem that appears at `dir` ("/" for all of it).
    root: String,
    fstype: String,
}

fn mount_at(dir: &Path) -> Option<Mount> {
    let dir = fs::canonicalize(dir).ok()?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    // "36 35 98:0 /root /mount/point options... - fstype source superoptions"; the last
    // mount on a point is the one seen there.
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let separator = fields.iter().position(|&field| field == "-")?;
            let (root, mount_point) = (fields.get(3)?, fields.get(4)?);
            let fstype = fields.get(separator + 1)?;
            (Path::new(&unescape(mount_point)) == dir).then(|| Mount {
                root: unescape(root),
                fstype: (*fstype).to_owned(),
            })
        })
        .next_back()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok());
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes the pin at `path`, if there is one (an earlier daemon's program, say).
pub fn remove_pin(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// Detaches the pinned link at `path` from its hook, whoever else holds it open (a running
/// daemon, say), and removes the pin.
pub fn detach_pinned_link(path: &Path) -> io::Result<()> {
    let name = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = [0u64; 16];
    attr[0] = name.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let mut attr = [0u64; 16];
    attr[0] = fd as u64;
    let detached = bpf(BPF_LINK_DETACH, &mut attr);
    // SAFETY: fd was returned by BPF_OBJ_GET above and is closed once.
    unsafe { libc::close(fd as i32) };
    match detached {
        // A link whose interface went away is already detached.
        Ok(_) => {}
        Err(err) if err.raw_os_error() == Some(libc::ENOLINK) => {}
        Err(err) => return Err(err),
    }
    fs::remove_file(path)
}

/// Removes the map pinned at `pin` when `outgrown` says an earlier tcpguard made it with another
/// layout: aya refuses a pinned map whose layout differs from the object's
/// (`IncompatiblePinnedMap`), and tcpguard would not start after an upgrade. Returns the removed
/// map's description; `None` when nothing is pinned there or the map fits.
pub fn remove_outgrown_map(
    pin: &Path,
    outgrown: impl FnOnce(&aya::maps::MapInfo) -> bool,
) -> io::Result<Option<aya::maps::MapInfo>> {
    let Ok(info) = aya::maps::MapData::from_pin(pin).and_then(|map| map.info()) else {
        return Ok(None);
    };
    if !outgrown(&info) {
        return Ok(None);
    }
    remove_pin(pin)?;
    Ok(Some(info))
}

/// Removes tcpguard's own pins from `dir` (on a BPF filesystem), links first so that nothing
/// stays attached, then the directory once it is empty. Anything else in it is left, and its
/// names are returned; a directory that is not on a BPF filesystem is refused untouched. A
/// missing directory is nothing to remove.
pub fn remove_pins(dir: &Path) -> Result<Vec<String>, PinDirError> {
    let removing = |path: &Path| {
        let path = path.to_owned();
        move |source| PinDirError::Remove { path, source }
    };
    match fs::symlink_metadata(dir) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(removing(dir)(source)),
        Ok(meta) if !meta.is_dir() => {
            return Err(PinDirError::NotDirectory {
                dir: dir.to_owned(),
            });
        }
        Ok(_) if !is_bpffs(dir) => {
            return Err(PinDirError::NotBpffs {
                dir: dir.to_owned(),
            });
        }
        Ok(_) => {}
    }
    // A TC filter added through netlink is no pinned link: it is deleted through netlink, and
    // its record with it.
    crate::tc::remove_recorded(dir).map_err(removing(dir))?;
    let mut links = Vec::new();
    let mut others = Vec::new();
    let mut foreign = Vec::new();
    for entry in fs::read_dir(dir).map_err(removing(dir))? {
        let entry = entry.map_err(removing(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().is_ok_and(|kind| kind.is_file());
        match (is_file && is_own_pin(&name), is_own_link(&name)) {
            (true, true) => links.push(entry.path()),
            (true, false) => others.push(entry.path()),
            (false, _) => foreign.push(name),
        }
    }
    for path in &links {
        detach_pinned_link(path).map_err(removing(path))?;
    }
    for path in &others {
        fs::remove_file(path).map_err(removing(path))?;
    }
    // A mount point stays: a BPF filesystem's root, or the unit's bind of the pin directory.
    if foreign.is_empty() && mount_at(dir).is_none() {
        fs::remove_dir(dir).map_err(removing(dir))?;
    }
    foreign.sort();
    Ok(foreign)
}

fn bpf(command: libc::c_long, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: attr is a zeroed bpf_attr of 128 bytes with the command's fields set.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_pins_are_tcpguards_names_only() {
        for name in [
            "FLOWS_V4",
            "FLOWS",
            "INTERFACE",
            "PROTECTED_PORTS",
            "DENY_V4",
            "REQSK_RESULTS",
            "prog_tcpguard_own",
            "prog_tcpguard_reqsk",
            "link_xdp_native_eth0",
            "link_tc_eth0",
            "link_reqsk_eth0",
        ] {
            assert!(is_own_pin(name), "{name}");
        }
        for name in [
            "tcpguard.toml",
            "prog_other",
            "link_",
            "link_tc_",
            "cilium_calls",
            "flows",
            "",
        ] {
            assert!(!is_own_pin(name), "{name}");
        }
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/sys/fs/bpf"), "/sys/fs/bpf");
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/a\\"), "/a\\");
    }
}
