//! What the kernel says about tcpguard's links, for a daemon that adopts an earlier one's: a
//! pinned link's type and program (aya's link info), and which interface of this network
//! namespace runs that program, as XDP and in which mode (`RTM_GETLINK`) or on a TCX hook
//! (aya's TCX query). A pin's name says which of tcpguard's links it is; where the link is
//! attached, and how, comes from here. The program answers it, not the link's interface index,
//! which aya does not give and which is the interface's in the link's own network namespace.

use std::{io, path::Path};

use aya::{
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, LinkInfo, PinnedLink},
    },
    sys::SyscallError,
};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage, LinkXdp},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Where a pinned link is when no interface of this network namespace runs its program.
pub const NO_INTERFACE_HERE: &str = "no interface of this network namespace (the one it was attached to is gone, or in another namespace)";

/// The link pinned at `path`, as the kernel describes it.
pub fn pinned(path: &Path) -> io::Result<LinkInfo> {
    let link = FdLink::from(PinnedLink::from_pin(path).map_err(link_error)?);
    link.info().map_err(link_error)
}

/// A failed system call is its error, as the kernel gave it.
fn link_error(err: LinkError) -> io::Error {
    match err {
        LinkError::SyscallError(SyscallError { io_error, .. }) => io_error,
        other => io::Error::other(other),
    }
}

/// The XDP programs an interface runs, by mode, as `ip link` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpPrograms {
    /// Native (driver) mode.
    pub driver: Option<u32>,
    /// Generic (skb) mode.
    pub skb: Option<u32>,
}

/// An interface of this network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    pub xdp: XdpPrograms,
}

/// The interfaces of this network namespace, with the XDP programs each runs.
pub fn interfaces() -> io::Result<Vec<Interface>> {
    const SEQUENCE: u32 = 1;
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = SEQUENCE;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    let mut interfaces = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        if read_dump(&datagram, SEQUENCE, &mut interfaces)? {
            return Ok(interfaces);
        }
    }
}

/// Adds the interfaces in one datagram of the kernel's answer to dump request `sequence` to
/// `interfaces`: whether the answer is complete, or the error the kernel sent.
fn read_dump(datagram: &[u8], sequence: u32, interfaces: &mut Vec<Interface>) -> io::Result<bool> {
    let mut rest = datagram;
    while !rest.is_empty() {
        let length = NetlinkBuffer::new_checked(rest)
            .map_err(io::Error::other)?
            .length() as usize;
        let message =
            NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest).map_err(io::Error::other)?;
        rest = rest.get(length.next_multiple_of(4)..).unwrap_or_default();
        if message.header.sequence_number != sequence {
            continue;
        }
        match message.payload {
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(error) => return Err(error.to_io()),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                interfaces.push(interface(link));
            }
            _ => {}
        }
    }
    Ok(false)
}

fn interface(link: LinkMessage) -> Interface {
    let mut interface = Interface {
        index: link.header.index,
        name: String::new(),
        xdp: XdpPrograms::default(),
    };
    for attribute in link.attributes {
        match attribute {
            LinkAttribute::IfName(name) => interface.name = name,
            LinkAttribute::Xdp(xdp) => {
                for item in xdp {
                    match item {
                        LinkXdp::DrvProgId(id) => interface.xdp.driver = Some(id),
                        LinkXdp::SkbProgId(id) => interface.xdp.skb = Some(id),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    interface
}

/// The interface of this network namespace whose TCX hook `attach_type` runs the program
/// `program_id`, if one does.
pub fn tcx_interface(program_id: u32, attach_type: TcAttachType) -> io::Result<Option<String>> {
    for interface in interfaces()? {
        if runs_tcx(interface.index, attach_type, program_id)? {
            return Ok(Some(interface.name));
        }
    }
    Ok(None)
}

/// Whether the TCX hook `attach_type` of the interface `index` runs the program `program_id`
/// (not if the interface is gone).
pub fn runs_tcx(index: u32, attach_type: TcAttachType, program_id: u32) -> io::Result<bool> {
    match SchedClassifier::query_tcx(index, attach_type) {
        Ok((_, programs)) => Ok(programs.iter().any(|program| program.id() == program_id)),
        Err(ProgramError::SyscallError(SyscallError { io_error, .. })) => {
            match io_error.raw_os_error() {
                Some(libc::ENODEV) => Ok(false),
                _ => Err(io_error),
            }
        }
        Err(err) => Err(io::Error::other(err)),
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{DoneMessage, ErrorMessage};
    use netlink_packet_route::link::XdpAttached;

    use super::*;

    /// `payload` as the kernel would send it in answer to request `sequence`, built by the
    /// crate's own emitter.
    fn message(sequence: u32, payload: NetlinkPayload<RouteNetlinkMessage>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = sequence;
        let mut message = NetlinkMessage::new(header, payload);
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    }

    fn link(index: u32, name: &str, xdp: Vec<LinkXdp>) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes.push(LinkAttribute::IfName(name.to_owned()));
        if !xdp.is_empty() {
            link.attributes.push(LinkAttribute::Xdp(xdp));
        }
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link))
    }

    #[test]
    fn reads_the_interfaces_and_their_xdp_programs_by_mode_from_a_dump() {
        let mut datagram = message(
            7,
            link(
                2,
                "veth0",
                vec![
                    LinkXdp::Attached(XdpAttached::Driver),
                    LinkXdp::DrvProgId(42),
                ],
            ),
        );
        // Another request's answer is not this one's.
        datagram.extend(message(8, link(3, "other", Vec::new())));
        datagram.extend(message(7, link(1, "lo", Vec::new())));
        let mut interfaces = Vec::new();
        assert!(!read_dump(&datagram, 7, &mut interfaces).unwrap());
        assert_eq!(
            interfaces,
            [
                Interface {
                    index: 2,
                    name: "veth0".to_owned(),
                    xdp: XdpPrograms {
                        driver: Some(42),
                        skb: None
                    }
                },
                Interface {
                    index: 1,
                    name: "lo".to_owned(),
                    xdp: XdpPrograms::default()
                }
            ]
        );
        let done = message(7, NetlinkPayload::Done(DoneMessage::default()));
        assert!(read_dump(&done, 7, &mut interfaces).unwrap());
    }

    #[test]
    fn an_error_message_is_the_kernels_error() {
        let mut error = ErrorMessage::default();
        error.code = std::num::NonZeroI32::new(-libc::ENODEV);
        let reply = message(1, NetlinkPayload::Error(error));
        let err = read_dump(&reply, 1, &mut Vec::new()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
    }

    #[test]
    fn asks_the_kernel_about_loopback() {
        // Loopback is index 1 in every network namespace, and runs no XDP program here.
        let interfaces = interfaces().expect("RTM_GETLINK dump");
        let lo = interfaces.iter().find(|interface| interface.index == 1);
        assert_eq!(
            lo,
            Some(&Interface {
                index: 1,
                name: "lo".to_owned(),
                xdp: XdpPrograms::default()
            })
        );
    }
}
