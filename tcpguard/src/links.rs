//! What the kernel says about tcpguard's links, for a daemon that adopts an earlier one's:
//! a pinned link's type, program and interface (`BPF_OBJ_GET_INFO_BY_FD`), and which XDP
//! programs an interface runs in which mode (`RTM_GETLINK`). A pin's name says which of
//! tcpguard's links it is; where the link is attached, and how, comes from here.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `enum bpf_link_type` in linux/bpf.h.
const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// What kind of link a pinned link is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Xdp,
    Tcx,
    /// Any other type, by its number.
    Other(u32),
}

/// A BPF link as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub kind: LinkKind,
    /// The program attached through it.
    pub program_id: u32,
    /// The interface it is attached to (XDP and TCX links), in the network namespace of that
    /// interface; 0 once the interface is gone (the link is then attached to nothing).
    pub ifindex: u32,
}

/// The link pinned at `path`, as the kernel describes it.
pub fn pinned(path: &Path) -> io::Result<LinkInfo> {
    let link = open_pin(path)?;
    // struct bpf_link_info: type, id, prog_id, then a union (8-byte aligned) whose xdp and tcx
    // members both start with the ifindex.
    let mut info = [0u32; 8];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
        _rest: [u64; 14],
    }
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
        _rest: [0; 14],
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkInfo {
        kind: match info[0] {
            BPF_LINK_TYPE_XDP => LinkKind::Xdp,
            BPF_LINK_TYPE_TCX => LinkKind::Tcx,
            other => LinkKind::Other(other),
        },
        program_id: info[2],
        ifindex: info[4],
    })
}

fn open_pin(path: &Path) -> io::Result<OwnedFd> {
    let name = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    #[repr(C)]
    struct GetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        _rest: [u64; 14],
    }
    let mut attr = GetAttr {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        _rest: [0; 14],
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn bpf<A>(command: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: attr is a bpf_attr for `command`, zeroed beyond its fields, of its full size.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr),
            size_of::<A>(),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
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

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HEADER: usize = 16;
const IFINFOMSG: usize = 16;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
/// The flags in an attribute's type (NLA_F_NESTED, NLA_F_NET_BYTEORDER).
const NLA_TYPE_MASK: u16 = 0x3fff;

/// The XDP programs of the interface `ifindex` in this network namespace.
pub fn xdp_programs(ifindex: u32) -> io::Result<XdpPrograms> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let socket = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if socket < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket is a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(socket) };
    const SEQUENCE: u32 = 1;
    let mut request = Vec::with_capacity(NLMSG_HEADER + IFINFOMSG);
    request.extend(((NLMSG_HEADER + IFINFOMSG) as u32).to_ne_bytes());
    request.extend(RTM_GETLINK.to_ne_bytes());
    request.extend(NLM_F_REQUEST.to_ne_bytes());
    request.extend(SEQUENCE.to_ne_bytes());
    request.extend(0u32.to_ne_bytes());
    // struct ifinfomsg: family, pad, type, index, flags, change.
    request.extend([libc::AF_UNSPEC as u8, 0, 0, 0]);
    request.extend(ifindex.to_ne_bytes());
    request.extend([0; 8]);
    // SAFETY: request is a valid buffer of its length.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = vec![0u8; 64 << 10];
    loop {
        // SAFETY: reply is a valid, writable buffer of its length.
        let received = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                reply.as_mut_ptr().cast(),
                reply.len(),
                0,
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(answer) = parse_link_reply(&reply[..received as usize], SEQUENCE) {
            return answer;
        }
    }
}

/// The answer in one datagram of the kernel's reply to RTM_GETLINK request `sequence`: the
/// link's XDP programs, or the error the kernel sent; `None` if it holds neither.
fn parse_link_reply(datagram: &[u8], sequence: u32) -> Option<io::Result<XdpPrograms>> {
    let u16_at = |bytes: &[u8], at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
    };
    let u32_at = |bytes: &[u8], at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut offset = 0;
    while offset + NLMSG_HEADER <= datagram.len() {
        let length = u32_at(datagram, offset)? as usize;
        let kind = u16_at(datagram, offset + 4)?;
        let message = datagram.get(offset..offset + length)?;
        if length < NLMSG_HEADER {
            return None;
        }
        if u32_at(message, 8)? == sequence {
            match kind {
                NLMSG_ERROR => {
                    let code = u32_at(message, NLMSG_HEADER)? as i32;
                    return Some(Err(io::Error::from_raw_os_error(-code)));
                }
                RTM_NEWLINK => {
                    let attributes = message.get(NLMSG_HEADER + IFINFOMSG..)?;
                    let programs = attribute(attributes, IFLA_XDP)
                        .map(|xdp| XdpPrograms {
                            driver: attribute(xdp, IFLA_XDP_DRV_PROG_ID)
                                .and_then(|id| u32_at(id, 0)),
                            skb: attribute(xdp, IFLA_XDP_SKB_PROG_ID).and_then(|id| u32_at(id, 0)),
                        })
                        .unwrap_or_default();
                    return Some(Ok(programs));
                }
                _ => {}
            }
        }
        offset += length.next_multiple_of(4);
    }
    None
}

/// The payload of the first netlink attribute of type `wanted` in `attributes`.
fn attribute(attributes: &[u8], wanted: u16) -> Option<&[u8]> {
    let mut offset = 0;
    while offset + 4 <= attributes.len() {
        let length = usize::from(u16::from_ne_bytes([
            attributes[offset],
            attributes[offset + 1],
        ]));
        let kind = u16::from_ne_bytes([attributes[offset + 2], attributes[offset + 3]]);
        if length < 4 {
            return None;
        }
        let payload = attributes.get(offset + 4..offset + length)?;
        if kind & NLA_TYPE_MASK == wanted {
            return Some(payload);
        }
        offset += length.next_multiple_of(4);
    }
    None
}

/// The name of the interface `ifindex` in this network namespace.
pub fn interface_name(ifindex: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: name has room for IF_NAMESIZE bytes, as if_indextoname requires.
    let found = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) };
    if found.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `name`.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute_bytes(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend(((4 + payload.len()) as u16).to_ne_bytes());
        bytes.extend(kind.to_ne_bytes());
        bytes.extend(payload);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    }

    fn message(kind: u16, sequence: u32, body: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend(((NLMSG_HEADER + body.len()) as u32).to_ne_bytes());
        bytes.extend(kind.to_ne_bytes());
        bytes.extend(0u16.to_ne_bytes());
        bytes.extend(sequence.to_ne_bytes());
        bytes.extend(0u32.to_ne_bytes());
        bytes.extend(body);
        bytes
    }

    #[test]
    fn reads_the_xdp_programs_by_mode_from_a_link_message() {
        let mut xdp = attribute_bytes(2, &[1]); // IFLA_XDP_ATTACHED: driver
        xdp.extend(attribute_bytes(IFLA_XDP_DRV_PROG_ID, &42u32.to_ne_bytes()));
        let mut body = vec![0; IFINFOMSG];
        body.extend(attribute_bytes(3, b"veth0\0")); // IFLA_IFNAME
        body.extend(attribute_bytes(IFLA_XDP | 0x8000, &xdp));
        let reply = message(RTM_NEWLINK, 7, &body);
        let programs = parse_link_reply(&reply, 7).unwrap().unwrap();
        assert_eq!(
            programs,
            XdpPrograms {
                driver: Some(42),
                skb: None
            }
        );
        // Another request's answer is not this one's.
        assert!(parse_link_reply(&reply, 8).is_none());
        // A link without XDP runs none.
        let bare = message(RTM_NEWLINK, 7, &[0; IFINFOMSG]);
        assert_eq!(
            parse_link_reply(&bare, 7).unwrap().unwrap(),
            XdpPrograms::default()
        );
    }

    #[test]
    fn an_error_message_is_the_kernels_error() {
        let mut body = (-libc::ENODEV).to_ne_bytes().to_vec();
        body.extend([0; NLMSG_HEADER]);
        let reply = message(NLMSG_ERROR, 1, &body);
        let err = parse_link_reply(&reply, 1).unwrap().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
    }

    #[test]
    fn asks_the_kernel_about_loopback() {
        // Loopback is index 1 in every network namespace, and runs no XDP program here.
        assert_eq!(interface_name(1).as_deref(), Some("lo"));
        assert!(xdp_programs(1).is_ok());
    }
}
