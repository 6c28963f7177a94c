/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every map and every struct shared between the kernel programs and user
 * space. The Rust side (ebpf/src/abi.rs) mirrors each struct with #[repr(C)]
 * and a compile-time size assert; change both together and bump
 * MB_LAYOUT_VERSION whenever a pinned map's key, value or type changes.
 */
#ifndef MESHBYPASS_MAPS_H
#define MESHBYPASS_MAPS_H

#include <linux/types.h>

/* Stamped into mb_config by the shared loader once every pin exists. */
#define MB_LAYOUT_VERSION 4

/* Acceleration modes, as written by the plugin into struct mb_pod.mode. */
#define MB_MODE_AUTO 0       /* all if the node's selftest passed, else proxy-only */
#define MB_MODE_ALL 1        /* redirect every paired direction */
#define MB_MODE_PROXY_ONLY 2 /* redirect only into the sidecar proxy's sockets; app sockets
                             * join mb_senders only where the kernel is SAFE_MEMBER */
#define MB_MODE_OFF 3        /* track nothing */
#define MB_MODE_ADAPTIVE 4   /* proxy sockets, and app sockets only while provably safe
                             * members: non-blocking files (opt-in) */

/* The drain conditions of resuming a direction (the program's
 * mb_drain_checks, a load-time constant: always both, except in the tests
 * that prove each one necessary). */
#define MB_DRAIN_SENDER_ACKED (1u << 0)  /* every byte the sender gave TCP is acknowledged */
#define MB_DRAIN_RECEIVER_READ (1u << 1) /* the receiver read every byte TCP gave it */

/* The guards of `adaptive` (the program's mb_adaptive_checks, a load-time
 * constant: always all, except in the tests that prove each one necessary). */
#define MB_ADAPTIVE_CONNECTED (1u << 0) /* a connected app socket is admitted only if non-blocking */
#define MB_ADAPTIVE_LISTENER (1u << 1)  /* an accepted one only if its listener was non-blocking */
#define MB_ADAPTIVE_SEND (1u << 2)      /* a send that finds the file blocking evicts the socket */
#define MB_ADAPTIVE_FED (1u << 3)       /* a socket a peer redirected into (maybe with a message
					 * still on its way) or with unread redirected bytes is
					 * never dropped from the maps */

/* mb_config.kernel_flags */
#define MB_KERNEL_PROBED (1u << 0)   /* a selftest verdict was recorded */
#define MB_KERNEL_SAFE_ALL (1u << 1) /* the verdict: redirecting into any socket is safe */
/* The verdict: a socket that is only a map member (never fed redirected data)
 * behaves as on plain TCP. Without it proxy-only keeps app sockets out of
 * every map: on 6.18 a blocking read() on any sockmap member returns EAGAIN
 * when woken without data (tcp_bpf_recvmsg waits once). */
#define MB_KERNEL_SAFE_MEMBER (1u << 5)
/* Hazards the selftest found (user space only; the programs read SAFE_ALL). */
#define MB_KERNEL_HAZARD_REDIRECT (1u << 2) /* redirected data did not arrive */
#define MB_KERNEL_HAZARD_SPLICE (1u << 3)   /* splice() readers hang or read EOF */
#define MB_KERNEL_HAZARD_FIONREAD (1u << 4) /* FIONREAD misses redirected bytes */
#define MB_KERNEL_HAZARD_BLOCKING (1u << 6) /* blocking read() on a target fails with EAGAIN */
#define MB_KERNEL_HAZARD_MEMBER (1u << 7)   /* ... and on a mere sender (in mb_senders) too */
#define MB_KERNEL_HAZARD_QUEUE (1u << 8)    /* a reader that never reads does not hold the writer back */

/* Counters: indexes into struct mb_counters.v (per CPU, summed by user space). */
enum mb_counter {
	MB_CTR_SOCKETS_TRACKED = 0, /* sockets put into the sockhashes */
	MB_CTR_PAIRS_PLAIN = 1,     /* connections paired by their reversed tuple */
	MB_CTR_PAIRS_NAT = 2,       /* connections paired across an iptables REDIRECT */
	MB_CTR_REDIRECTED_MSGS = 3, /* sendmsg calls handed socket to socket */
	MB_CTR_REDIRECTED_BYTES = 4,
	MB_CTR_PASSTHROUGH_MSGS = 5, /* sendmsg calls of tracked sockets left to the stack */
	MB_CTR_PAIRS_REFUSED = 6,    /* ambiguous or unexplained joins: no pairing */
	MB_CTR_MAP_FULL = 7,         /* a map update failed: the socket stays on the stack */
	MB_CTR_REDIRECT_FAILED = 8,  /* a paired peer was gone at send: fell back, sticky */
	MB_CTR_PASSTHROUGH_BYTES = 9,
	MB_CTR_STICKY = 10,          /* directions pinned to the stack for their life */
	MB_CTR_RECEIVER_FULL = 11,   /* directions sent back to the stack: the receiver's queue was over its bound */
	MB_CTR_RESUMED = 12,         /* ... and redirected again once both paths had drained (proxy receivers) */
	MB_CTR_STACK_BYTES = 13,     /* directions sent to the stack: bytes went through TCP unseen (TCP Fast Open) */
	MB_CTR_ADMITTED = 14,        /* app sockets `adaptive` let into the maps (non-blocking files) */
	MB_CTR_EVICTED = 15,         /* ... that turned blocking and left the maps */
	MB_CTR_ZEROCOPY = 16,        /* directions sent to the stack: the sender uses SO_ZEROCOPY,
				      * whose completions only TCP delivers */
	MB_CTR_BUDGET = 17,          /* sockets left on the stack: their pod was at its socket budget */
	MB_CTR_MAX = 24,
};

/* All counters of one CPU: one lookup per message updates several. */
struct mb_counters {
	__u64 v[MB_CTR_MAX];
};

/* An address as 16 bytes: IPv6, or IPv4 as ::ffff:a.b.c.d; network order. */
struct mb_addr {
	__u32 a[4];
};

/* One TCP socket: its netns, its 4-tuple as the socket sees it and its
 * socket cookie. Key of mb_senders, mb_targets and mb_pairs. The cookie makes a key
 * name that very socket: a later socket with the same 4-tuple (a port
 * reused while an old peer still refers to it) has another cookie, and
 * cookies are never reused. Ports in host order. */
struct mb_sock_key {
	__u64 netns; /* netns cookie: loopback and 127.0.0.6 repeat across pods */
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u16 local_port;
	__u16 remote_port;
	__u32 pad; /* zero */
	__u64 cookie; /* bpf_get_socket_cookie() */
};

/* One TCP connection as both its ends can name it at establishment: the
 * active side's local endpoint in its netns (iptables REDIRECT rewrites only
 * the destination, so the passive side reads it as its remote endpoint) and
 * the two initial sequence numbers (+1), which NAT leaves alone and which
 * tell apart connections that share the local endpoint (Linux lets one
 * local port carry connections to different destinations). Key of
 * mb_endpoints. */
struct mb_endpoint_key {
	__u64 netns;
	__u32 ip[4];
	__u16 port;
	__u16 pad0;
	__u32 seq_active;  /* the active side's ISN + 1 */
	__u32 seq_passive; /* the passive side's ISN + 1 */
	__u32 pad1;
};

/* mb_endpoint.flags */
#define MB_EP_ACTIVE (1u << 0)        /* the waiting socket connected (else it accepted) */
#define MB_EP_TARGET (1u << 1)        /* it is in mb_targets: data may be redirected into it */
#define MB_EP_OUTBOUND_PORT (1u << 2) /* passive, on its pod's outbound proxy port */
#define MB_EP_AMBIGUOUS (1u << 3)     /* two sockets claimed this endpoint: pair nobody */
#define MB_EP_PROXY (1u << 4)         /* the waiting socket is the sidecar proxy's */
#define MB_EP_SENDER (1u << 5)        /* it is in mb_senders: its sends may be redirected */
#define MB_EP_INBOUND_PORT (1u << 6)  /* passive, on its pod's inbound proxy port */
#define MB_EP_ADAPTIVE (1u << 7)      /* an app socket `adaptive` admitted */

/* The first of two sockets to establish, waiting for its other end. */
struct mb_endpoint {
	struct mb_sock_key key;
	__u64 dest_netns; /* the netns its remote endpoint is in; 0 = none we know */
	__u32 flags;      /* MB_EP_* */
	__u32 pad;
};

/* mb_pair.flags */
#define MB_PAIR_NAT (1u << 0)
#define MB_PAIR_PEER_PROXY (1u << 1) /* the receiving end is the sidecar proxy's socket */
#define MB_PAIR_PEER_ADAPTIVE (1u << 2) /* ... an app socket `adaptive` admitted (mark it fed) */

/* A socket's paired peer: present only for directions allowed to redirect. */
struct mb_pair {
	struct mb_sock_key peer;
	__u32 flags; /* MB_PAIR_* */
	__u32 pad;
};

/* A registered pod: value of mb_pods (by IP) and mb_netns (by netns cookie). */
struct mb_pod {
	__u64 netns;         /* netns cookie of the pod */
	__u32 proxy_uid;     /* the sidecar's UID; ~0 = none */
	__u32 proxy_gid;     /* the sidecar's GID; ~0 = none */
	__u16 outbound_port; /* REDIRECT target of outbound TCP (15001); 0 = none */
	__u16 inbound_port;  /* REDIRECT target of inbound TCP (15006); 0 = none */
	__u8 mode;           /* MB_MODE_* */
	__u8 flags;          /* reserved, zero */
	__u16 pad;
};

/* Node-wide settings, one entry. */
struct mb_config {
	__u32 layout_version; /* MB_LAYOUT_VERSION once the loader finished; 0 = incomplete */
	__u32 kernel_flags;   /* MB_KERNEL_* */
	__u64 probed_at;      /* unix seconds of the recorded selftest verdict */
	__u64 object_hash;    /* FNV-1a of the object the pinned programs came from */
};

/* mb_sk_state.flags */
#define MB_SK_HAVE_UID (1u << 0)  /* uid/gid recorded at TCP_CONNECT_CB */
#define MB_SK_TRACKED (1u << 1)   /* established and in the sockhashes */
#define MB_SK_PROXY (1u << 2)     /* the sidecar proxy's socket */
#define MB_SK_IN_TARGETS (1u << 3)     /* in mb_targets */
#define MB_SK_EP_OWNER (1u << 4)  /* it created mb_endpoints[ep] */
#define MB_SK_STICKY (1u << 5)    /* a byte it sent went through the stack: on the stack it stays */
#define MB_SK_PEER_KNOWN (1u << 6) /* peer holds a key a redirect already succeeded with */
#define MB_SK_PEER_PROXY (1u << 7) /* the peer is a proxy socket (from mb_pair.flags) */
#define MB_SK_RESUMABLE (1u << 8)  /* sticky only because the receiver was full: may resume */
#define MB_SK_ADAPTIVE (1u << 9)   /* an app socket `adaptive` admitted: its sends check its file */
#define MB_SK_EVICT (1u << 10)     /* ... and its file turned blocking: it leaves the maps */
#define MB_SK_PASSIVE (1u << 11)   /* it was accepted (else it connected) */
#define MB_SK_COUNTED (1u << 12)   /* it counts against its pod's socket budget */
#define MB_SK_FED_PEER (1u << 13)  /* it marked its `adaptive` peer fed (mb_fed) */
#define MB_SK_CLOSED (1u << 15)    /* its connection closed; it may connect again */
#define MB_SK_LEARN (1u << 14)     /* an accepted app socket whose file `adaptive` reads at its
				    * first packet, to learn what its port accepts */
#define MB_SK_WAIT_LOCAL (1u << 16) /* waits with an off-node peer: only its pod's proxy, through
				    * the outbound REDIRECT, can join it, before its second packet */
#define MB_SK_FIRST_SENT (1u << 17) /* ... and its first packet (the handshake's last) left */

/* Per-socket state (socket local storage). */
struct mb_sk_state {
	struct mb_sock_key self;
	struct mb_sock_key peer;
	struct mb_endpoint_key ep;
	__u32 uid;
	__u32 gid;
	__u32 flags; /* MB_SK_* */
	__u32 seq0;  /* write_seq while no byte of this socket went through TCP */
	__u64 target; /* kernel address of the peer socket, kept while MB_SK_RESUMABLE */
	__u32 budget_gen; /* mb_pod_sockets.gen when it was counted */
	__u32 pad;
};

/* How many of a pod's sockets are tracked: one pod may use at most
 * mb_pod_socket_budget of the node-wide maps (its further sockets stay on
 * the stack). Value of mb_pod_sockets, by netns cookie. */
struct mb_pod_sockets {
	__u32 count;
	__u32 generation; /* this registration's: a socket counted under an earlier one
		    * (the pod was DELeted and ADDed again) does not uncount here */
};

/* A listening port of a pod, as `adaptive` judges the sockets accepted on
 * it. Key of mb_ports. */
struct mb_port_key {
	__u64 netns;
	__u16 port; /* host order */
	__u16 pad0;
	__u32 pad1;
};

/* mb_port.flags */
#define MB_PORT_LISTENER_NONBLOCK (1u << 0) /* every listener on it was non-blocking at listen() */
#define MB_PORT_ACCEPTED_BLOCKING (1u << 1) /* an accepted socket turned out blocking: admit none */
#define MB_PORT_ACCEPTED_NONBLOCK (1u << 2) /* an accepted socket was seen non-blocking (learned) */

struct mb_port {
	__u32 flags; /* MB_PORT_* */
	__u32 pad;
};

#ifdef __BPF__
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* Sockets whose sends may be redirected; the sk_msg program is attached here.
 * Written by sockops at establishment; the kernel removes closed sockets. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct mb_sock_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_senders SEC(".maps");

/* The only possible redirect targets; no program. In proxy-only mode only
 * proxy sockets enter it, so a wrong key can never feed an app socket.
 * Written by sockops, read by bpf_msg_redirect_hash in sk_msg. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct mb_sock_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_targets SEC(".maps");

/* socket -> the peer its sends are redirected to. Written by sockops when the
 * second end establishes, read by sk_msg until the peer is cached, deleted by
 * sockops at close and by the plugin on pod DEL. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 131072);
	__type(key, struct mb_sock_key);
	__type(value, struct mb_pair);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_pairs SEC(".maps");

/* endpoint -> the first end of a connection waiting for the second. Written and
 * consumed by sockops; the owner deletes a leftover at close. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct mb_endpoint_key);
	__type(value, struct mb_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_endpoints SEC(".maps");

/* pod IP -> pod. Written by the plugin (ADD/DEL), read by sockops to find the
 * netns of a remote endpoint. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct mb_addr);
	__type(value, struct mb_pod);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_pods SEC(".maps");

/* netns cookie -> pod. Written by the plugin, read by sockops: the datapath
 * acts only on sockets of registered pods. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct mb_pod);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_netns SEC(".maps");

/* netns cookie -> the pod's tracked sockets. Created by the plugin (ADD,
 * without resetting a count), counted by sockops (establishment, close),
 * removed with the pod (DEL). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct mb_pod_sockets);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_pod_sockets SEC(".maps");

/* `adaptive` socket -> a peer has redirected into it. Written by the peer's
 * sk_msg before its first redirect into it, read by sockops before it
 * drops the socket from the maps (never a fed one: a redirect may still be
 * on its way), deleted at its close and with its pod (DEL). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct mb_sock_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_fed SEC(".maps");

/* (netns, port) -> what `adaptive` knows of the sockets accepted there.
 * Written by sockops at listen() and by sk_msg when an admitted accepted
 * socket turns out blocking; read by sockops when a connection is accepted;
 * removed with the pod (DEL). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct mb_port_key);
	__type(value, struct mb_port);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_ports SEC(".maps");

/* Node-wide settings. Written by the loader and the selftest, read by sockops. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mb_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_config SEC(".maps");

/* Counters (enum mb_counter), one entry. Written by both programs, read by status. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mb_counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_counters SEC(".maps");

/* Per-socket state. Written by sockops and sk_msg; freed with the socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct mb_sk_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mb_sk_state SEC(".maps");
#endif /* __BPF__ */

#endif /* MESHBYPASS_MAPS_H */
