//! The BPF filesystem: where tcpguard pins its maps, programs and links, and how they are
//! taken down again, also from a process other than the daemon that pinned them.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

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
    #[error("{dir} is not on a BPF filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs { dir: PathBuf },
    #[error("pinning under {dir}: {source}")]
    Create { dir: PathBuf, source: io::Error },
}

/// Makes `dir`, where pins go; its parent must be on a BPF filesystem.
pub fn prepare_pin_dir(dir: &Path) -> Result<(), PinDirError> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) {
        return Err(PinDirError::NotBpffs {
            dir: parent.to_owned(),
        });
    }
    fs::create_dir_all(dir).map_err(|source| PinDirError::Create {
        dir: dir.to_owned(),
        source,
    })
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

/// Removes everything tcpguard pinned in `dir`, links (and netlink TC filters) first, so that
/// nothing stays attached, then the directory. A missing directory is nothing to remove.
pub fn remove_pins(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    // A TC filter added through netlink is no pinned link: it is deleted through netlink.
    crate::tc::remove_recorded(dir)?;
    let mut others = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let is_link = path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("link_"));
        if is_link {
            detach_pinned_link(&path)?;
        } else {
            others.push(path);
        }
    }
    for path in others {
        // The netlink TC filter's record may be listed after remove_recorded took it.
        remove_pin(&path)?;
    }
    fs::remove_dir(dir)
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
