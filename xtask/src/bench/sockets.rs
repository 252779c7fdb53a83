//! Which process holds the server side of a loopback TCP connection: how
//! the crash runs tell the replacement worker's answers from the other
//! worker's (both accept on the same listening socket).
//!
//! The socket is looked up with the kernel's sock_diag netlink interface
//! (what `ss` uses), by its exact address pair. /proc/net/tcp would say the
//! same but walks the whole connection table on every read: 100 ms here,
//! far coarser than what is measured.

use std::io;
use std::mem::size_of;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `SOCK_DIAG_BY_FAMILY` from linux/sock_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `INET_DIAG_NOCOOKIE`: look the socket up by its addresses alone.
const NO_COOKIE: u32 = !0;

/// `struct inet_diag_sockid`: ports and addresses in network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
struct SocketId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct nlmsghdr` + `struct inet_diag_req_v2`.
#[repr(C)]
struct Request {
    header: libc::nlmsghdr,
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SocketId,
}

/// `struct nlmsghdr` + `struct inet_diag_msg`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Reply {
    header: libc::nlmsghdr,
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SocketId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// The inode of the TCP socket whose own address is `local` and whose peer
/// is `remote`; `None` if there is none.
pub fn socket_inode(local: SocketAddrV4, remote: SocketAddrV4) -> io::Result<Option<u64>> {
    // SAFETY: socket(2) has no memory preconditions; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let address = |a: &SocketAddrV4| [u32::from_ne_bytes(a.ip().octets()), 0, 0, 0];
    let request = Request {
        header: libc::nlmsghdr {
            nlmsg_len: size_of::<Request>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            // Not a dump: the kernel looks up this one socket.
            nlmsg_flags: libc::NLM_F_REQUEST as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_TCP as u8,
        ext: 0,
        pad: 0,
        states: !0,
        id: SocketId {
            sport: local.port().to_be(),
            dport: remote.port().to_be(),
            src: address(&local),
            dst: address(&remote),
            interface: 0,
            cookie: [NO_COOKIE; 2],
        },
    };
    // SAFETY: `request` is a plain repr(C) value of the size given.
    let sent = unsafe { libc::send(socket.as_raw_fd(), (&request as *const Request).cast(), size_of::<Request>(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buffer = [0u8; 1024];
    // SAFETY: `buffer` is writable for its whole length.
    let received = unsafe { libc::recv(socket.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_reply(&buffer[..received as usize], remote.port())
}

/// The inode in a sock_diag answer; `None` for "no such socket". Without
/// a connection from that peer the kernel answers with the socket that
/// listens on `local`, which every worker holds: that is no answer either.
fn parse_reply(data: &[u8], peer_port: u16) -> io::Result<Option<u64>> {
    if data.len() < size_of::<libc::nlmsghdr>() {
        return Err(io::Error::other("short sock_diag answer"));
    }
    // SAFETY: at least a header's bytes; read_unaligned has no alignment needs.
    let header: libc::nlmsghdr = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
    match header.nlmsg_type {
        SOCK_DIAG_BY_FAMILY if data.len() >= size_of::<Reply>() => {
            // SAFETY: as above, with a whole `Reply`'s bytes.
            let reply: Reply = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
            Ok((u16::from_be(reply.id.dport) == peer_port).then_some(u64::from(reply.inode)))
        }
        kind if kind == libc::NLMSG_ERROR as u16 && data.len() >= size_of::<libc::nlmsghdr>() + 4 => {
            let at = size_of::<libc::nlmsghdr>();
            let errno = -i32::from_ne_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
            match errno {
                libc::ENOENT => Ok(None),
                errno => Err(io::Error::from_raw_os_error(errno)),
            }
        }
        kind => Err(io::Error::other(format!("unexpected sock_diag answer of type {kind}"))),
    }
}

/// Which of `pids` holds socket `inode` open.
pub fn owner(inode: u64, pids: &[i32]) -> Option<i32> {
    let target = format!("socket:[{inode}]");
    pids.iter().copied().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str()))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpListener, TcpStream};

    fn v4(address: SocketAddr) -> SocketAddrV4 {
        match address {
            SocketAddr::V4(v4) => v4,
            SocketAddr::V6(_) => panic!("not IPv4: {address}"),
        }
    }

    #[test]
    fn finds_the_process_that_holds_each_side_of_a_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let (server, peer) = (v4(accepted.local_addr().unwrap()), v4(client.local_addr().unwrap()));
        let server_side = socket_inode(server, peer).unwrap().expect("the accepted socket");
        let client_side = socket_inode(peer, server).unwrap().expect("the client socket");
        assert_ne!(server_side, client_side);
        let me = std::process::id() as i32;
        assert_eq!(owner(server_side, &[me]), Some(me));
        assert_eq!(owner(server_side, &[]), None);

        // The kernel would answer with the listening socket.
        let unknown = SocketAddrV4::new(*server.ip(), 1);
        assert_eq!(socket_inode(server, unknown).unwrap(), None);
    }
}
