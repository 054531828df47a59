//! The plugin's network configuration over rtnetlink (the testbed builds its namespaces'
//! links with it too): links (veth pairs, moves between
//! namespaces, names, up), addresses and routes, in the network namespace of the thread that
//! opened the [`Netlink`] handle. The plugin is synchronous (one call, then exit): each
//! handle drives its netlink connection on a runtime of its own, one request at a time.
//!
//! What `ip` did for the plugin and how it is done here:
//! `ip link add H type veth peer name P` -> [`Netlink::add_veth`]; `ip link set P netns N`
//! -> [`Netlink::move_to_netns`]; `ip link set P name E` -> [`Netlink::rename`]; `ip link set
//! X up` -> [`Netlink::set_up`]; `ip addr add A dev X [nodad]` -> [`Netlink::add_address`];
//! `ip route replace A dev X` (scope link) and `ip route add default via G dev X` ->
//! [`Netlink::add_route`]; `ip link show`/`ip addr show` -> [`Netlink::link`],
//! [`Netlink::addresses`].
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// A netlink request that failed: what was asked, and the kernel's (or the socket's) answer.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct NetlinkError {
    pub what: String,
    pub source: std::io::Error,
}

fn failed(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |e| {
        let source = match &e {
            rtnetlink::Error::NetlinkError(m) => match m.code {
                Some(code) => std::io::Error::from_raw_os_error(-code.get()),
                None => std::io::Error::other(e.to_string()),
            },
            _ => std::io::Error::other(e.to_string()),
        };
        NetlinkError { what, source }
    }
}

/// A link as the plugin needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub up: bool,
    /// `aa:bb:cc:dd:ee:ff`, empty when the link has no hardware address.
    pub mac: String,
}

impl Link {
    fn of(msg: &LinkMessage) -> Link {
        let mac = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(bytes) => {
                    Some(bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"))
                }
                _ => None,
            })
            .unwrap_or_default();
        Link { index: msg.header.index, up: msg.header.flags.contains(LinkFlags::Up), mac }
    }
}

/// Where a route sends its packets.
#[derive(Clone, Copy, Debug)]
pub enum Via {
    /// Straight out of the interface (`dev X`, scope link).
    Link,
    /// Straight out of the interface, with this preferred source address (`dev X src S`).
    LinkFrom(IpAddr),
    /// Through a gateway reachable on the interface (`via G dev X`).
    Gateway(IpAddr),
}

/// A netlink connection in the network namespace of the thread that opened it.
pub struct Netlink {
    runtime: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace.
    pub fn open() -> Result<Netlink, NetlinkError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| NetlinkError { what, source }
        };
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(io("starting a runtime"))?;
        let (connection, handle, _) =
            runtime.block_on(async { rtnetlink::new_connection() }).map_err(io("opening a netlink socket"))?;
        runtime.spawn(connection);
        Ok(Netlink { runtime, handle })
    }

    /// The link named `name`, if there is one.
    pub fn link(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let req = self.handle.link().get().match_name(name).execute();
        match self.runtime.block_on(async {
            futures_util::pin_mut!(req);
            req.try_next().await
        }) {
            Ok(msg) => Ok(msg.as_ref().map(Link::of)),
            Err(rtnetlink::Error::NetlinkError(m)) if m.code.is_some_and(|c| -c.get() == libc_enodev()) => Ok(None),
            Err(e) => Err(failed(format!("looking up link {name}"))(e)),
        }
    }

    /// The link named `name`; an error when there is none.
    pub fn existing_link(&self, name: &str) -> Result<Link, NetlinkError> {
        self.link(name)?.ok_or_else(|| NetlinkError {
            what: format!("looking up link {name}"),
            source: std::io::Error::from_raw_os_error(libc_enodev()),
        })
    }

    /// Creates the veth pair `name` <-> `peer` (both down, in this namespace).
    pub fn add_veth(&self, name: &str, peer: &str) -> Result<(), NetlinkError> {
        let msg = LinkVeth::new(name, peer).build();
        self.runtime
            .block_on(self.handle.link().add(msg).execute())
            .map_err(failed(format!("creating the veth pair {name} <-> {peer}")))
    }

    /// Creates the veth pair `name` (here) <-> `peer` (directly in the network namespace
    /// open at `peer_netns_fd`), both down: neither end ever exists anywhere else.
    pub fn add_veth_with_peer_in(&self, name: &str, peer: &str, peer_netns_fd: RawFd) -> Result<(), NetlinkError> {
        let peer_msg =
            LinkMessageBuilder::<LinkUnspec>::new().name(peer.to_string()).setns_by_fd(peer_netns_fd).build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(name.to_string())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.runtime
            .block_on(self.handle.link().add(msg).execute())
            .map_err(failed(format!("creating the veth pair {name} <-> {peer} (in another namespace)")))
    }

    /// Deletes a link (for a veth, both ends and the routes through it).
    pub fn delete_link(&self, link: &Link, name: &str) -> Result<(), NetlinkError> {
        self.runtime
            .block_on(self.handle.link().del(link.index).execute())
            .map_err(failed(format!("deleting link {name}")))
    }

    /// Moves a link into the network namespace open at `netns_fd`.
    pub fn move_to_netns(&self, link: &Link, name: &str, netns_fd: RawFd) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(link.index).setns_by_fd(netns_fd).build();
        self.runtime
            .block_on(self.handle.link().set(msg).execute())
            .map_err(failed(format!("moving link {name} into the pod's network namespace")))
    }

    /// Renames a link (it must be down).
    pub fn rename(&self, link: &Link, from: &str, to: &str) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(link.index).name(to).build();
        self.runtime
            .block_on(self.handle.link().set(msg).execute())
            .map_err(failed(format!("renaming link {from} to {to}")))
    }

    /// Sets a link up.
    pub fn set_up(&self, link: &Link, name: &str) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(link.index).up().build();
        self.runtime.block_on(self.handle.link().set(msg).execute()).map_err(failed(format!("setting link {name} up")))
    }

    /// Sets a link down.
    pub fn set_down(&self, link: &Link, name: &str) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(link.index).down().build();
        self.runtime
            .block_on(self.handle.link().set(msg).execute())
            .map_err(failed(format!("setting link {name} down")))
    }

    /// Adds `address/prefix_len` to a link; `nodad`: usable at once (no duplicate address
    /// detection, IPv6).
    pub fn add_address(
        &self,
        link: &Link,
        name: &str,
        address: IpAddr,
        prefix_len: u8,
        nodad: bool,
    ) -> Result<(), NetlinkError> {
        let mut req = self.handle.address().add(link.index, address, prefix_len);
        if nodad {
            let msg = req.message_mut();
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.runtime.block_on(req.execute()).map_err(failed(format!("adding address {address}/{prefix_len} to {name}")))
    }

    /// The addresses of a link.
    pub fn addresses(&self, link: &Link, name: &str) -> Result<Vec<IpAddr>, NetlinkError> {
        let req = self.handle.address().get().set_link_index_filter(link.index).execute();
        let msgs: Vec<_> =
            self.runtime.block_on(req.try_collect()).map_err(failed(format!("listing the addresses of {name}")))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == link.index)
            .flat_map(|m| &m.attributes)
            .filter_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
            .collect())
    }

    /// Adds (or replaces) the route to `dest/prefix_len` through `link`.
    pub fn add_route(
        &self,
        link: &Link,
        name: &str,
        dest: IpAddr,
        prefix_len: u8,
        via: Via,
    ) -> Result<(), NetlinkError> {
        let what = match via {
            Via::Link => format!("adding the route {dest}/{prefix_len} dev {name}"),
            Via::LinkFrom(src) => format!("adding the route {dest}/{prefix_len} dev {name} src {src}"),
            Via::Gateway(g) => format!("adding the route {dest}/{prefix_len} via {g} dev {name}"),
        };
        let msg = match (dest, via) {
            (IpAddr::V4(d), Via::Link) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d, prefix_len)
                .output_interface(link.index)
                .scope(RouteScope::Link)
                .build(),
            (IpAddr::V4(d), Via::Gateway(IpAddr::V4(g))) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d, prefix_len)
                .gateway(g)
                .output_interface(link.index)
                .build(),
            (IpAddr::V4(d), Via::LinkFrom(IpAddr::V4(src))) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d, prefix_len)
                .output_interface(link.index)
                .scope(RouteScope::Link)
                .pref_source(src)
                .build(),
            (IpAddr::V6(d), Via::Link) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d, prefix_len)
                .output_interface(link.index)
                .build(),
            (IpAddr::V6(d), Via::LinkFrom(IpAddr::V6(src))) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d, prefix_len)
                .output_interface(link.index)
                .pref_source(src)
                .build(),
            (IpAddr::V6(d), Via::Gateway(IpAddr::V6(g))) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d, prefix_len)
                .gateway(g)
                .output_interface(link.index)
                .build(),
            _ => {
                return Err(NetlinkError {
                    what,
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "gateway or source of another family",
                    ),
                });
            }
        };
        self.runtime.block_on(self.handle.route().add(msg).replace().execute()).map_err(failed(what))
    }
}

/// ENODEV: "no such device", what the kernel answers for a link that does not exist.
fn libc_enodev() -> i32 {
    nix::errno::Errno::ENODEV as i32
}
