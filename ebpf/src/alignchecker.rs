//! Checks every `#[repr(C)]` mirror in [`crate::abi`] against the C struct
//! it mirrors, as the compiler laid it out: the embedded object's BTF gives
//! each member's offset and size (cilium's `alignchecker` does the same
//! for its Go mirrors). The size asserts in `abi.rs` catch a struct that
//! grew; this catches two members swapped or retyped at the same size.

use std::{collections::HashMap, mem::offset_of};

use object::{Object, ObjectSection};

use crate::{
    OBJECT,
    abi::{
        Addr, Config, CounterBlock, Endpoint, EndpointKey, Pair, Pod, PodSockets, Port, PortKey, SkState,
        SockKey,
    },
};

/// A struct's layout: its size and, in order, (member, byte offset, size).
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    size: usize,
    members: Vec<(String, usize, usize)>,
}

/// A Rust mirror: its C struct name and its layout, members under their C
/// names (`rust_field => "c_name"` where they differ).
macro_rules! mirror {
    ($rust:ident = $c:literal { $($field:ident $(=> $c_field:literal)?),* $(,)? }) => {{
        let v = $rust::default();
        (
            $c,
            stringify!($rust),
            Layout {
                size: size_of::<$rust>(),
                members: vec![$((
                    mirror!(@name $field $($c_field)?).to_owned(),
                    offset_of!($rust, $field),
                    size_of_val(&v.$field),
                )),*],
            },
        )
    }};
    (@name $field:ident $c_field:literal) => { $c_field };
    (@name $field:ident) => { stringify!($field) };
}

/// Every mirrored struct: (C name, Rust name, Rust layout).
fn mirrors() -> Vec<(&'static str, &'static str, Layout)> {
    vec![
        mirror!(Addr = "mb_addr" { a }),
        mirror!(SockKey = "mb_sock_key" { netns, local_ip, remote_ip, local_port, remote_port, pad, cookie }),
        mirror!(EndpointKey = "mb_endpoint_key" { netns, ip, port, pad0, seq_active, seq_passive, pad1 }),
        mirror!(Endpoint = "mb_endpoint" { key, dest_netns, flags, pad }),
        mirror!(Pair = "mb_pair" { peer, flags, pad }),
        mirror!(Pod = "mb_pod" { netns, proxy_uid, proxy_gid, outbound_port, inbound_port, mode, flags, pad }),
        mirror!(PortKey = "mb_port_key" { netns, port, pad0, pad1 }),
        mirror!(Port = "mb_port" { flags, pad }),
        mirror!(PodSockets = "mb_pod_sockets" { count, generation }),
        mirror!(Config = "mb_config" { layout_version, kernel_flags, probed_at, object_hash }),
        mirror!(SkState = "mb_sk_state" { self_key => "self", peer, ep, uid, gid, flags, seq0, target, budget_gen, pad }),
        mirror!(CounterBlock = "mb_counters" { v }),
    ]
}

#[test]
fn every_mirror_matches_the_objects_btf() {
    let btf = Btf::of_object(OBJECT);
    let mirrors = mirrors();
    let mut differences: Vec<String> = crate::abi::header::STRUCTS
        .iter()
        .filter(|c| !mirrors.iter().any(|(name, _, _)| name == *c))
        .map(|c| format!("struct {c} has no Rust mirror in alignchecker::mirrors()"))
        .collect();
    for (c, rust, layout) in mirrors {
        match btf.layout(c) {
            None => differences.push(format!(
                "struct {c} (mirrored by {rust}) is not in the object's BTF"
            )),
            Some(found) if found != layout => differences.push(describe(c, rust, &found, &layout)),
            Some(_) => {}
        }
    }
    assert!(
        differences.is_empty(),
        "the Rust mirrors differ from the C structs:\n{}",
        differences.join("\n")
    );
}

/// The checker can fail: a mirror with two same-sized members swapped
/// (what no size assert sees) differs.
#[test]
fn a_swapped_member_is_a_difference() {
    let btf = Btf::of_object(OBJECT);
    let (c, _, mut layout) = mirror!(Pod = "mb_pod" { netns, proxy_uid, proxy_gid, outbound_port, inbound_port, mode, flags, pad });
    assert_eq!(btf.layout(c).as_ref(), Some(&layout));
    let (uid, gid) = (layout.members[1].0.clone(), layout.members[2].0.clone());
    (layout.members[1].0, layout.members[2].0) = (gid, uid);
    assert_ne!(btf.layout(c).as_ref(), Some(&layout));
}

fn describe(c: &str, rust: &str, found: &Layout, mirror: &Layout) -> String {
    let mut out = format!("struct {c} ({rust}):");
    if found.size != mirror.size {
        out += &format!("\n  size: C {}, Rust {}", found.size, mirror.size);
    }
    let len = found.members.len().max(mirror.members.len());
    for i in 0..len {
        let (f, m) = (found.members.get(i), mirror.members.get(i));
        if f != m {
            let show = |x: Option<&(String, usize, usize)>| {
                x.map_or("-".to_owned(), |(name, offset, size)| {
                    format!("{name} at {offset} size {size}")
                })
            };
            out += &format!("\n  member {i}: C {}, Rust {}", show(f), show(m));
        }
    }
    out
}

/// The parts of a `.BTF` section a layout needs (linux/btf.h): every
/// type's kind, size or referenced type, and its members or array shape.
struct Btf {
    types: Vec<Type>,
    names: HashMap<String, usize>,
}

#[derive(Clone, Debug)]
enum Type {
    /// The void type (ID 0) and kinds without a size of their own here.
    Other,
    /// INT, ENUM, ENUM64, FLOAT, and STRUCT/UNION (with members).
    Sized {
        size: usize,
        members: Vec<Member>,
        bitfields: bool,
    },
    Ptr,
    Array {
        elem: u32,
        len: usize,
    },
    /// TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG.
    Alias(u32),
}

#[derive(Clone, Debug)]
struct Member {
    name: String,
    ty: u32,
    bit_offset: u32,
}

const BTF_MAGIC: u16 = 0xeb9f;

impl Btf {
    fn of_object(object: &[u8]) -> Self {
        let file = object::File::parse(object).expect("the embedded object is ELF");
        let section = file
            .section_by_name(".BTF")
            .expect("the object has a .BTF section");
        Self::parse(section.data().expect("the .BTF section's data"))
    }

    fn parse(data: &[u8]) -> Self {
        let u16_at = |at: usize| u16::from_ne_bytes(data[at..at + 2].try_into().expect("2 bytes"));
        let u32_at = |at: usize| u32::from_ne_bytes(data[at..at + 4].try_into().expect("4 bytes"));
        assert_eq!(u16_at(0), BTF_MAGIC, "not BTF, or not in this host's byte order");
        let hdr_len = u32_at(4) as usize;
        let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
        let (str_off, str_len) = (u32_at(16) as usize, u32_at(20) as usize);
        let strings = &data[hdr_len + str_off..hdr_len + str_off + str_len];
        let string = |off: u32| {
            let s = &strings[off as usize..];
            String::from_utf8_lossy(&s[..s.iter().position(|b| *b == 0).expect("NUL")]).into_owned()
        };

        let mut types = vec![Type::Other];
        let mut names = HashMap::new();
        let (mut at, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
        while at < end {
            let (name_off, info, size_or_type) = (u32_at(at), u32_at(at + 4), u32_at(at + 8));
            let (kind, vlen, kind_flag) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31 == 1);
            at += 12;
            let ty = match kind {
                // INT: one u32 of encoding follows.
                1 => {
                    at += 4;
                    Type::Sized {
                        size: size_or_type as usize,
                        members: Vec::new(),
                        bitfields: false,
                    }
                }
                2 => Type::Ptr,
                3 => {
                    let (elem, len) = (u32_at(at), u32_at(at + 8) as usize);
                    at += 12;
                    Type::Array { elem, len }
                }
                // STRUCT, UNION: vlen members of (name, type, offset).
                4 | 5 => {
                    let members = (0..vlen)
                        .map(|i| {
                            let m = at + 12 * i;
                            let offset = u32_at(m + 8);
                            // With kind_flag the top 8 bits are a bitfield size.
                            let (bitfield, bit_offset) = if kind_flag {
                                (offset >> 24, offset & 0xff_ffff)
                            } else {
                                (0, offset)
                            };
                            (
                                Member {
                                    name: string(u32_at(m)),
                                    ty: u32_at(m + 4),
                                    bit_offset,
                                },
                                bitfield != 0,
                            )
                        })
                        .collect::<Vec<_>>();
                    at += 12 * vlen;
                    Type::Sized {
                        size: size_or_type as usize,
                        bitfields: members.iter().any(|(_, b)| *b),
                        members: members.into_iter().map(|(m, _)| m).collect(),
                    }
                }
                // ENUM: vlen (name, value) of 8 bytes; ENUM64: of 12.
                6 | 19 => {
                    at += vlen * if kind == 6 { 8 } else { 12 };
                    Type::Sized {
                        size: size_or_type as usize,
                        members: Vec::new(),
                        bitfields: false,
                    }
                }
                16 => Type::Sized {
                    size: size_or_type as usize,
                    members: Vec::new(),
                    bitfields: false,
                },
                8..=11 | 18 => Type::Alias(size_or_type),
                // FWD, FUNC: nothing follows.
                7 | 12 => Type::Other,
                // FUNC_PROTO: vlen params of 8 bytes.
                13 => {
                    at += 8 * vlen;
                    Type::Other
                }
                // VAR, DECL_TAG: one u32 follows.
                14 | 17 => {
                    at += 4;
                    Type::Other
                }
                // DATASEC: vlen (type, offset, size) of 12 bytes.
                15 => {
                    at += 12 * vlen;
                    Type::Other
                }
                other => panic!("unknown BTF kind {other}"),
            };
            if kind == 4 {
                names.insert(string(name_off), types.len());
            }
            types.push(ty);
        }
        Self { types, names }
    }

    fn size(&self, id: u32) -> usize {
        match &self.types[id as usize] {
            Type::Sized { size, .. } => *size,
            Type::Ptr => size_of::<u64>(),
            Type::Array { elem, len } => self.size(*elem) * len,
            Type::Alias(next) => self.size(*next),
            Type::Other => panic!("BTF type {id} has no size"),
        }
    }

    /// The layout of `struct <name>`, `None` when the object has none.
    fn layout(&self, name: &str) -> Option<Layout> {
        let id = *self.names.get(name)?;
        let Type::Sized {
            size,
            members,
            bitfields,
        } = &self.types[id]
        else {
            unreachable!("struct names point at structs");
        };
        assert!(
            !bitfields,
            "struct {name} has bitfields, which no Rust mirror can have"
        );
        Some(Layout {
            size: *size,
            members: members
                .iter()
                .map(|m| {
                    assert_eq!(m.bit_offset % 8, 0, "{name}.{} is not byte aligned", m.name);
                    (m.name.clone(), (m.bit_offset / 8) as usize, self.size(m.ty))
                })
                .collect(),
        })
    }
}
