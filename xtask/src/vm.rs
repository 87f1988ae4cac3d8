//! The guests for `cargo xtask vm-test`: Debian root filesystems built with mmdebstrap from
//! Debian's registry, each with its release's own cloud kernel and the initramfs that loads its
//! virtio modules, turned into an ext4 disk image. Each is built into a cache directory named
//! after a hash of everything that goes into it, and rebuilt only when that changes.

use std::{
    fs,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::succeeds;

/// A Debian release the VM test boots, with what tcpguard must do on its kernel.
pub struct Release {
    /// The suite mmdebstrap installs.
    pub suite: &'static str,
    /// How the test's output names it.
    pub name: &'static str,
    /// The cookie path tcpguard must choose there with `cookie_mode = "auto"`.
    pub cookie_mode: &'static str,
    /// How tcpguard must attach its TC egress program there.
    pub tc_attach: &'static str,
}

/// The guests, oldest first. Debian 12's 6.1, the oldest kernel tcpguard supports, has no TCX
/// (TC goes through netlink) and no `bpf_sk_assign_tcp_reqsk` (the kernel's cookies). Debian
/// 13's 6.12 has both (TCX, tcpguard's own cookies).
pub const RELEASES: &[Release] = &[
    Release {
        suite: "bookworm",
        name: "Debian 12 (6.1)",
        cookie_mode: "kernel",
        tc_attach: "netlink",
    },
    Release {
        suite: "trixie",
        name: "Debian 13 (6.12)",
        cookie_mode: "own",
        tc_attach: "tcx",
    },
];
const MIRROR: &str = "http://deb.debian.org/debian";
/// What the guest runs: systemd, the cloud kernel, a web server (python3), Prometheus and its
/// node exporter (the guest kernel's TCP counters), and the tools the setup script uses.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "iproute2",
    "python3",
    "curl",
    "prometheus",
    "prometheus-node-exporter",
    "ca-certificates",
    "kmod",
    "procps",
    "ethtool",
    "iputils-ping",
];
const DISK_SIZE: &str = "3G";

/// The guest's address on the test's tap network, and the host's.
pub const GUEST: &str = "10.202.0.2";
pub const HOST: &str = "10.202.0.1";

/// Files written into the guest, by path.
fn guest_files() -> Vec<(&'static str, String)> {
    vec![
        ("etc/hostname", "tcpguard-vm\n".to_owned()),
        ("etc/fstab", "/dev/vda / ext4 defaults 0 1\n".to_owned()),
        (
            "etc/systemd/network/10-eth0.network",
            format!("[Match]\nName=eth0\n\n[Network]\nAddress={GUEST}/24\nGateway={HOST}\n"),
        ),
        // The test serves setup.sh (and the package it installs) from the host side.
        (
            "etc/systemd/system/vm-setup.service",
            format!(
                "[Unit]\nDescription=Set up the guest from the host's setup script\n\
                 Wants=network-online.target\nAfter=network-online.target\n\n\
                 [Service]\nType=oneshot\nRemainAfterExit=yes\n\
                 ExecStart=/bin/sh -c 'until curl -fsS -o /root/setup.sh http://{HOST}:8000/setup.sh; do sleep 1; done; exec sh -x /root/setup.sh'\n\
                 StandardOutput=journal+console\n\n[Install]\nWantedBy=multi-user.target\n"
            ),
        ),
    ]
}

/// Units enabled in the guest, as `systemctl enable` would link them.
const ENABLED: &[(&str, &str)] = &[
    ("systemd-networkd.service", "multi-user.target.wants"),
    (
        "systemd-networkd-wait-online.service",
        "network-online.target.wants",
    ),
    ("vm-setup.service", "multi-user.target.wants"),
];

/// The guest's kernel, initramfs and disk.
pub struct Image {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
}

/// The image of `suite` for the current inputs, built into `cache` if it is not there yet.
pub fn image(cache: &Path, suite: &str) -> anyhow::Result<Image> {
    let mut hasher = DefaultHasher::new();
    (suite, MIRROR, PACKAGES, DISK_SIZE, guest_files(), ENABLED).hash(&mut hasher);
    let dir = cache.join(format!("{suite}-{:016x}", hasher.finish()));
    let image = Image {
        dir: dir.clone(),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        disk: dir.join("disk.raw"),
    };
    if image.kernel.exists() && image.initrd.exists() && image.disk.exists() {
        println!("vm: using the cached guest in {}", dir.display());
        return Ok(image);
    }
    println!(
        "vm: building the guest in {} (a few minutes, once)",
        dir.display()
    );
    let build = dir.with_extension("building");
    let _ = fs::remove_dir_all(&build);
    fs::create_dir_all(&build)?;
    let tar = build.join("root.tar");
    if !succeeds(
        Command::new("mmdebstrap")
            .args(["--variant=apt", "--quiet"])
            .arg(format!("--include={}", PACKAGES.join(",")))
            .arg(suite)
            .arg(&tar)
            .arg(MIRROR),
    ) {
        bail!("mmdebstrap could not build the {suite} guest");
    }
    let root = build.join("root");
    fs::create_dir_all(&root)?;
    if !succeeds(
        Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(&root),
    ) {
        bail!("cannot unpack {}", tar.display());
    }
    for (path, text) in guest_files() {
        let path = root.join(path);
        fs::create_dir_all(path.parent().unwrap())?;
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    for (unit, wants) in ENABLED {
        let wants_dir = root.join("etc/systemd/system").join(wants);
        fs::create_dir_all(&wants_dir)?;
        let target = if *unit == "vm-setup.service" {
            format!("/etc/systemd/system/{unit}")
        } else {
            format!("/usr/lib/systemd/system/{unit}")
        };
        let link = wants_dir.join(unit);
        let _ = fs::remove_file(&link);
        symlink(target, link)?;
    }
    let boot = root.join("boot");
    let find = |prefix: &str| -> anyhow::Result<PathBuf> {
        fs::read_dir(&boot)?
            .flatten()
            .map(|entry| entry.path())
            .find(|path| {
                path.file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with(prefix))
            })
            .with_context(|| format!("no {prefix}* in the guest's /boot"))
    };
    fs::copy(find("vmlinuz-")?, build.join("vmlinuz"))?;
    fs::copy(find("initrd.img-")?, build.join("initrd.img"))?;
    if !succeeds(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(&root)
            .arg(build.join("disk.raw"))
            .arg(DISK_SIZE),
    ) {
        bail!("mkfs.ext4 could not make the guest's disk");
    }
    fs::remove_dir_all(&root)?;
    fs::remove_file(&tar)?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&build, &dir)?;
    Ok(image)
}
