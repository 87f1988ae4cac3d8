//! Network namespaces for tests. Anonymous ones live as long as the thread that made them;
//! named ones (needed to run other programs inside) are deleted when their guard drops, also
//! when a test panics, and so is every veth, address and XDP attachment inside them.

use std::{
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

/// Runs `body` on a thread of its own inside a new, empty network namespace with loopback up,
/// `tcp_syncookies=2` and `tcp_timestamps=2`. The namespace disappears with the thread.
pub fn in_fresh_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    let handle = thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which runs nothing else.
        let status = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            status,
            0,
            "unshare(CLONE_NEWNET) failed (tests need root): {}",
            std::io::Error::last_os_error()
        );
        for (name, value) in [
            ("net/ipv4/tcp_syncookies", "2"),
            ("net/ipv4/tcp_timestamps", "2"),
        ] {
            std::fs::write(format!("/proc/sys/{name}"), value)
                .unwrap_or_else(|err| panic!("cannot set {name}: {err}"));
        }
        body()
    });
    match handle.join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A named network namespace, deleted on drop.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    /// A new namespace called `tg<pid>-<n>-<role>` with loopback up.
    pub fn new(role: &str) -> Self {
        let name = format!(
            "tg{}-{}-{role}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let namespace = Self { name };
        namespace.run("ip", &["link", "set", "lo", "up"]);
        namespace
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Runs a command inside the namespace and panics with its output if it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let output = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
        assert!(
            output.status.success(),
            "{program} {args:?} in {} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    pub fn sysctl(&self, name: &str, value: &str) {
        self.run("sysctl", &["-qw", &format!("{name}={value}")]);
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a command on the host and panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

impl Namespace {
    /// Runs `body` on a thread that has entered this namespace: sockets it opens and interfaces
    /// it names are this namespace's.
    pub fn within<T: Send + 'static>(&self, body: impl FnOnce() -> T + Send + 'static) -> T {
        match self.spawn(body).join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Like [`Namespace::within`], without waiting for `body` to finish.
    pub fn spawn<T: Send + 'static>(
        &self,
        body: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        thread::spawn(move || {
            enter(&path);
            body()
        })
    }
}

fn enter(path: &str) {
    let file = std::fs::File::open(path).unwrap_or_else(|err| panic!("cannot open {path}: {err}"));
    // SAFETY: setns on a namespace file affects only the calling thread.
    let status = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
    assert_eq!(
        status,
        0,
        "setns({path}) failed: {}",
        std::io::Error::last_os_error()
    );
}
