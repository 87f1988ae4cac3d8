//! systemd's readiness protocol (sd_notify): one datagram to `$NOTIFY_SOCKET`, when set.

use std::{io, os::unix::net::UnixDatagram};

/// Sends `state` (lines such as `READY=1`) to systemd. Without `$NOTIFY_SOCKET` (not started
/// by systemd with `Type=notify`) there is nobody to tell, and that is not an error.
pub fn notify(state: &str) -> io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let socket = UnixDatagram::unbound()?;
    let path = path.to_string_lossy();
    if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        socket.send_to_addr(state.as_bytes(), &address)?;
    } else {
        socket.send_to(state.as_bytes(), path.as_ref())?;
    }
    Ok(())
}
