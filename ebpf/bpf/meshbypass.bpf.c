// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The sockmap bypass: sockops tracks and pairs the TCP sockets of registered
 * pods, sk_msg hands a paired socket's sends straight to its peer's receive
 * queue. Invariants (docs/DESIGN.md): never mis-deliver, never reorder,
 * fall back to the stack on anything unknown.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#include "meshbypass_maps.h"

#define AF_INET 2
#define AF_INET6 10
#define MB_EEXIST 17

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline struct mb_counters *counters(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&mb_counters, &zero);
}

static __always_inline void count(__u32 idx, __u64 n)
{
	struct mb_counters *c = counters();

	if (c && idx < MB_CTR_MAX)
		c->v[idx] += n;
}

/* A remote endpoint inside the socket's own netns that no pod IP names:
 * loopback, and the source addresses Istio's inbound passthrough binds to
 * reach the app through it (127.0.0.6 is in 127/8; ::6 for IPv6). */
static __always_inline int is_loopback(const __u32 a[4])
{
	if (a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff))
		return (a[3] & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000);
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && (a[3] == bpf_htonl(1) || a[3] == bpf_htonl(6));
}

static __always_inline int addr_eq(const __u32 a[4], const __u32 b[4])
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline int key_eq(const struct mb_sock_key *a, const struct mb_sock_key *b)
{
	return a->cookie == b->cookie && a->netns == b->netns && addr_eq(a->local_ip, b->local_ip) &&
	       addr_eq(a->remote_ip, b->remote_ip) && a->local_port == b->local_port &&
	       a->remote_port == b->remote_port;
}

static __always_inline __u32 kernel_flags(void)
{
	__u32 zero = 0;
	struct mb_config *cfg = bpf_map_lookup_elem(&mb_config, &zero);

	return cfg ? cfg->kernel_flags : 0;
}

/* The effective mode of a pod: auto follows the node's selftest verdict. */
static __always_inline __u8 effective_mode(const struct mb_pod *pod, __u32 kflags)
{
	if (pod->mode != MB_MODE_AUTO)
		return pod->mode;
	if (kflags & MB_KERNEL_SAFE_ALL)
		return MB_MODE_ALL;
	return MB_MODE_PROXY_ONLY;
}

/* The socket's key; 0 when the family is not TCP over IPv4/IPv6. Every ctx
 * field is read once, unconditionally, before any branch: clang otherwise
 * merges loads through a moved ctx pointer, which the verifier refuses. */
static __always_inline int sock_key(struct bpf_sock_ops *s, __u64 netns, struct mb_sock_key *k)
{
	__u32 family = s->family;
	__u32 lport = s->local_port;
	__u32 rport = s->remote_port;
	__u32 l4 = s->local_ip4, r4 = s->remote_ip4;
	__u32 l6_0 = s->local_ip6[0], l6_1 = s->local_ip6[1];
	__u32 l6_2 = s->local_ip6[2], l6_3 = s->local_ip6[3];
	__u32 r6_0 = s->remote_ip6[0], r6_1 = s->remote_ip6[1];
	__u32 r6_2 = s->remote_ip6[2], r6_3 = s->remote_ip6[3];

	asm volatile("" ::: "memory");
	k->netns = netns;
	if (family == AF_INET) {
		k->local_ip[0] = 0;
		k->local_ip[1] = 0;
		k->local_ip[2] = bpf_htonl(0xffff);
		k->local_ip[3] = l4;
		k->remote_ip[0] = 0;
		k->remote_ip[1] = 0;
		k->remote_ip[2] = bpf_htonl(0xffff);
		k->remote_ip[3] = r4;
	} else if (family == AF_INET6) {
		k->local_ip[0] = l6_0;
		k->local_ip[1] = l6_1;
		k->local_ip[2] = l6_2;
		k->local_ip[3] = l6_3;
		k->remote_ip[0] = r6_0;
		k->remote_ip[1] = r6_1;
		k->remote_ip[2] = r6_2;
		k->remote_ip[3] = r6_3;
	} else {
		return 0;
	}
	/* local_port is in host order; remote_port in network order (32 bits). */
	k->local_port = (__u16)lport;
	k->remote_port = (__u16)bpf_ntohl(rport);
	k->pad = 0;
	k->cookie = bpf_get_socket_cookie(s);
	return 1;
}

static __always_inline void on_connect(struct bpf_sock_ops *skops)
{
	__u64 netns = bpf_get_netns_cookie(skops);
	struct bpf_sock *sk = skops->sk;
	struct mb_sk_state *st;
	__u64 ugid;

	if (!sk || !bpf_map_lookup_elem(&mb_netns, &netns))
		return;
	st = bpf_sk_storage_get(&mb_sk_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		count(MB_CTR_MAP_FULL, 1);
		return;
	}
	/* connect() runs in the caller's context: this is the creating process. */
	ugid = bpf_get_current_uid_gid();
	st->uid = (__u32)ugid;
	st->gid = (__u32)(ugid >> 32);
	st->flags |= MB_SK_HAVE_UID;
}

/*
 * The few kernel fields the programs read beyond their contexts, through
 * BTF pointers and CO-RE (relocated by the loader against the running
 * kernel's BTF; these are not the kernel's definitions).
 */
struct file___mb {
	unsigned int f_flags;
} __attribute__((preserve_access_index));

struct socket___mb {
	struct file___mb *file;
} __attribute__((preserve_access_index));

/* The socket flags (enum sock_flags bits) live in sock_common on recent
 * kernels, in struct sock itself on older ones. */
struct sock_common___mb {
	unsigned long skc_flags;
} __attribute__((preserve_access_index));

struct sock___mb {
	struct sock_common___mb __sk_common;
	void *sk_user_data;
	int sk_rcvbuf;
	int sk_rcvlowat;
	struct socket___mb *sk_socket;
	unsigned long sk_flags;
} __attribute__((preserve_access_index));

struct tcp_sock___mb {
	__u32 rcv_nxt;
	__u32 copied_seq;
	__u32 snd_una;
	__u32 write_seq;
} __attribute__((preserve_access_index));

struct sk_psock___mb {
	__u32 msg_tot_len;
} __attribute__((preserve_access_index));

/* The program's context is the kernel's struct sk_msg. */
struct sk_msg___mb {
	struct sock___mb *sk_redir;
} __attribute__((preserve_access_index));

#define MB_SK_USER_DATA_PSOCK 4UL  /* SK_USER_DATA_PSOCK: sk_user_data is a psock */
#define MB_SK_USER_DATA_FLAGS 7UL  /* NOCOPY | BPF | PSOCK, tagged in the low bits */
#define MB_QUEUE_FLOOR (1u << 20)  /* bound = max(receiver's sk_rcvbuf, 1 MiB) */

/* Bytes in the redirect queue of socket `t`; ~0 when unreadable (taken as
 * full: the safe side), 0 when it has no psock. */
static __always_inline __u32 queued_at(struct sock___mb *t)
{
	struct sk_psock___mb *ps;
	__u64 ud = 0;
	__u32 queued = 0;

	if (bpf_core_read(&ud, sizeof(ud), &t->sk_user_data))
		return ~0u;
	if (!(ud & MB_SK_USER_DATA_PSOCK))
		return 0;
	ps = (void *)(ud & ~MB_SK_USER_DATA_FLAGS);
	if (bpf_core_read(&queued, sizeof(queued), &ps->msg_tot_len))
		return ~0u;
	return queued;
}

#define MB_O_NONBLOCK 04000 /* O_NONBLOCK (asm-generic, x86, arm64) */

/* Whether the socket's file is non-blocking: 1 yes, 0 no, -1 unknown (no
 * file yet: an accepted socket before accept(), or one being torn down). */
/* The kernel socket behind a program's socket pointer (NULL if not TCP). */
static __always_inline struct sock___mb *kernel_sock(struct bpf_sock *sk)
{
	return (void *)bpf_skc_to_tcp_sock(sk);
}

static __always_inline int file_nonblocking(struct sock___mb *sk)
{
	struct socket___mb *so = 0;
	struct file___mb *f = 0;
	__u32 fl = 0;

	if (!sk)
		return -1;
	if (bpf_core_read(&so, sizeof(so), &sk->sk_socket) || !so)
		return -1;
	if (bpf_core_read(&f, sizeof(f), &so->file) || !f)
		return -1;
	if (bpf_core_read(&fl, sizeof(fl), &f->f_flags))
		return -1;
	return (fl & MB_O_NONBLOCK) != 0;
}

/* Bytes redirected into the socket and not read yet; ~0 when unknown (a
 * kernel without msg_tot_len, before 6.14). */
static __always_inline __u32 unread_redirected(struct sock___mb *sk)
{
	if (!sk || !bpf_core_field_exists(struct sk_psock___mb, msg_tot_len))
		return ~0u;
	return queued_at(sk);
}

/* Which guards `adaptive` applies: all of them. Only the tests that prove
 * each one necessary load the program with one removed. */
const volatile __u32 mb_adaptive_checks = MB_ADAPTIVE_CONNECTED | MB_ADAPTIVE_LISTENER |
					  MB_ADAPTIVE_SEND | MB_ADAPTIVE_FED;

/* The most sockets of one pod the maps hold (set at load; a quarter of the
 * socket maps by default): one pod cannot fill the node's maps. */
const volatile __u32 mb_pod_socket_budget = 16384;

/* Counts the socket against its pod's budget; 0 when the pod is at it (the
 * check and the add are not one atomic step: concurrent establishments can
 * pass the budget by at most one per CPU). */
static __always_inline int reserve(struct mb_sk_state *st)
{
	struct mb_pod_sockets *u = bpf_map_lookup_elem(&mb_pod_sockets, &st->self.netns);

	if (!u)
		return 1; /* registered without a count: no budget to keep */
	if (u->count >= mb_pod_socket_budget) {
		count(MB_CTR_BUDGET, 1);
		return 0;
	}
	__sync_fetch_and_add(&u->count, 1);
	st->budget_gen = u->generation;
	st->flags |= MB_SK_COUNTED;
	return 1;
}

static __always_inline void release(struct mb_sk_state *st)
{
	struct mb_pod_sockets *u;

	if (!(st->flags & MB_SK_COUNTED))
		return;
	st->flags &= ~MB_SK_COUNTED;
	u = bpf_map_lookup_elem(&mb_pod_sockets, &st->self.netns);
	if (u && u->generation == st->budget_gen)
		__sync_fetch_and_add(&u->count, -1);
}

/* Membership: targets first, then senders (a socket may sit in both;
 * mb_targets carries no program). Returns 0 when a map is full or the pod at its budget; the
 * socket is then in neither. */
static __always_inline int join_maps(struct bpf_sock_ops *skops, struct mb_sk_state *st, __u32 target, __u32 sender)
{
	if (!reserve(st))
		return 0;
	if (target) {
		if (bpf_sock_hash_update(skops, &mb_targets, &st->self, BPF_ANY)) {
			count(MB_CTR_MAP_FULL, 1);
			release(st);
			return 0;
		}
		st->flags |= MB_SK_IN_TARGETS;
	}
	if (sender && bpf_sock_hash_update(skops, &mb_senders, &st->self, BPF_ANY)) {
		count(MB_CTR_MAP_FULL, 1);
		if (target)
			bpf_map_delete_elem(&mb_targets, &st->self);
		st->flags &= ~MB_SK_IN_TARGETS;
		release(st);
		return 0;
	}
	return 1;
}

static __always_inline void leave_maps(struct mb_sk_state *st)
{
	bpf_map_delete_elem(&mb_senders, &st->self);
	bpf_map_delete_elem(&mb_targets, &st->self);
	st->flags &= ~MB_SK_IN_TARGETS;
	release(st);
}

/* mb_pairs[from] = to, only if `from` has no entry yet. 0 on success. */
static __always_inline long write_pair(const struct mb_sock_key *from, const struct mb_sock_key *to, __u32 flags)
{
	struct mb_pair p = {};

	p.peer = *to;
	p.flags = flags;
	return bpf_map_update_elem(&mb_pairs, from, &p, BPF_NOEXIST);
}

/* What one end knows of itself when it establishes (see on_established). */
struct mb_end {
	__u32 active;
	__u32 can_receive;
	__u32 can_send;
	__u32 proxy;
	__u32 admitted; /* an app socket `adaptive` admitted */
	__u32 ports; /* MB_EP_OUTBOUND_PORT | MB_EP_INBOUND_PORT */
	__u64 dest_netns;
};

/* A socket now in the maps: its close must clean up after it, and an app
 * socket `adaptive` admitted must leave again if its file turns blocking:
 * sk_msg checks the file at each send and marks it, and the socket's next
 * packet (on_packet, usually in that very send) takes it out. */
static __always_inline void track(struct bpf_sock_ops *skops, struct mb_sk_state *st, const struct mb_end *self)
{
	__u32 cb = BPF_SOCK_OPS_STATE_CB_FLAG;

	if (self->admitted) {
		st->flags |= MB_SK_ADAPTIVE | (self->active ? 0 : MB_SK_PASSIVE);
		cb |= BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
		count(MB_CTR_ADMITTED, 1);
	}
	if (st->flags & MB_SK_WAIT_LOCAL)
		cb |= BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | cb);
	count(MB_CTR_SOCKETS_TRACKED, 1);
}

/*
 * The second end of a connection joins the first, which waits in
 * mb_endpoints under the same key (the same local endpoint of the active
 * side and the same two ISNs). Pairing needs evidence in both directions:
 * the key ties the active side's source to the passive socket; the active
 * side's destination must tie back to the passive socket: the same address
 * and port (plain), or the pod whose inbound proxy port accepted it, or the
 * active side's own netns for the outbound proxy port (iptables REDIRECT).
 *
 * The pair entries are written before the endpoint is claimed, and the claim
 * is the endpoint's deletion: of all joiners and the waiter's own close,
 * exactly one deletes it. A joiner that loses takes its entries back; a
 * waiter that closes deletes its endpoint before its pair entry, so an entry
 * written for it by a joiner that then won is deleted too. Nothing is left
 * for a socket that is gone. Returns 0 when it refuses before any claim that
 * is not another joiner's: the caller then declines the first end.
 */
static __always_inline int join(struct bpf_sock_ops *skops, struct mb_sk_state *st,
				 const struct mb_end *self, const struct mb_endpoint *first,
				 const struct mb_endpoint_key *ek)
{
	const struct mb_sock_key *a, *p;
	__u32 first_can_receive = first->flags & MB_EP_TARGET;
	__u32 first_can_send = first->flags & MB_EP_SENDER;
	__u32 first_proxy = first->flags & MB_EP_PROXY;
	__u32 p_ports, plain, consistent, self_sends, self_receives, first_sends, first_receives, flags;
	__u64 a_dest;

	if (self->active) {
		a = &st->self;
		a_dest = self->dest_netns;
		p = &first->key;
		p_ports = first->flags & (MB_EP_OUTBOUND_PORT | MB_EP_INBOUND_PORT);
	} else {
		a = &first->key;
		a_dest = first->dest_netns;
		p = &st->self;
		p_ports = self->ports;
	}
	plain = addr_eq(a->remote_ip, p->local_ip) && a->remote_port == p->local_port;
	if (plain)
		consistent = a_dest == p->netns;
	else
		consistent = ((p_ports & MB_EP_INBOUND_PORT) && a_dest == p->netns) ||
			     ((p_ports & MB_EP_OUTBOUND_PORT) && a->netns == p->netns);
	if (!consistent) {
		/* Translated by something other than our REDIRECT, or aimed
		 * elsewhere than where it arrived: unexplained. */
		count(MB_CTR_PAIRS_REFUSED, 1);
		return 0;
	}

	/* What each end needs now that both are known. */
	self_sends = self->can_send && first_can_receive;
	self_receives = self->can_receive && first_can_send;
	first_sends = first_can_send && self->can_receive;
	first_receives = first_can_receive && self->can_send;
	flags = plain ? 0 : MB_PAIR_NAT;

	if ((self_sends || self_receives) && !join_maps(skops, st, self_receives, self_sends))
		return 0; /* full: both on the stack */
	if (self_sends && write_pair(&st->self, &first->key,
				     flags | (first_proxy ? MB_PAIR_PEER_PROXY : 0) |
					     ((first->flags & MB_EP_ADAPTIVE) ? MB_PAIR_PEER_ADAPTIVE : 0))) {
		count(MB_CTR_MAP_FULL, 1);
		leave_maps(st);
		return 0;
	}
	if (first_sends) {
		long err = write_pair(&first->key, &st->self,
				      flags | (self->proxy ? MB_PAIR_PEER_PROXY : 0) |
					      (self->admitted ? MB_PAIR_PEER_ADAPTIVE : 0));

		if (err) {
			/* -EEXIST: another joiner wrote it; theirs, not ours to take back. */
			count(err == -MB_EEXIST ? MB_CTR_PAIRS_REFUSED : MB_CTR_MAP_FULL, 1);
			if (self_sends)
				bpf_map_delete_elem(&mb_pairs, &st->self);
			leave_maps(st);
			return err == -MB_EEXIST;
		}
	}
	if (bpf_map_delete_elem(&mb_endpoints, ek)) {
		/* Claimed by another joiner, or the first end closed. */
		if (self_sends)
			bpf_map_delete_elem(&mb_pairs, &st->self);
		if (first_sends)
			bpf_map_delete_elem(&mb_pairs, &first->key);
		leave_maps(st);
		count(MB_CTR_PAIRS_REFUSED, 1);
		return 1;
	}
	if (!first_sends)
		bpf_map_delete_elem(&mb_senders, &first->key);
	if (!first_receives)
		bpf_map_delete_elem(&mb_targets, &first->key);
	if (!self_sends && !self_receives)
		return 1; /* nothing to redirect either way: the pair stays on the stack */
	st->flags |= MB_SK_TRACKED | (self->proxy ? MB_SK_PROXY : 0);
	track(skops, st, self);
	count(plain ? MB_CTR_PAIRS_PLAIN : MB_CTR_PAIRS_NAT, 1);
	return 1;
}

/* What `adaptive` knows of the sockets accepted on a port of a pod
 * (MB_PORT_*), 0 when nothing listened there. */
static __always_inline __u32 port_flags(__u64 netns, __u16 port)
{
	struct mb_port_key pk = {.netns = netns, .port = port};
	struct mb_port *p = bpf_map_lookup_elem(&mb_ports, &pk);

	return p ? p->flags : 0;
}

#define MB_PORT_KNOWN (MB_PORT_LISTENER_NONBLOCK | MB_PORT_ACCEPTED_NONBLOCK | MB_PORT_ACCEPTED_BLOCKING)

/* Whether `adaptive` admits sockets accepted on a port with these flags:
 * every listener on it was non-blocking at listen(), a socket accepted there
 * was seen non-blocking, and none turned out blocking. */
static __always_inline int port_admits(__u32 flags)
{
	return (flags & MB_PORT_KNOWN) == (MB_PORT_LISTENER_NONBLOCK | MB_PORT_ACCEPTED_NONBLOCK);
}

/* Whether an accepted socket on such a port should teach `adaptive` what
 * the port accepts: its listeners are non-blocking, nothing was learned yet. */
static __always_inline int port_learns(__u32 flags)
{
	return (flags & MB_PORT_KNOWN) == MB_PORT_LISTENER_NONBLOCK;
}

/*
 * A socket of a registered pod has established. It is the first end of its
 * connection to show up, and then waits in mb_endpoints (in the maps its
 * class allows), or the second, and then the pair is known: each end joins
 * exactly the maps its directions need (a socket in a map pays tcp_bpf's
 * costs even when nothing is redirected), and the pair entries are written.
 */
static __always_inline int establish(struct bpf_sock_ops *skops, struct bpf_sock *sk, const struct mb_pod *pod,
				     const struct mb_sock_key *key, const struct mb_endpoint_key *ek, __u64 dest_netns,
				     __u32 remote_local, __u32 seq0, int active)
{
	struct mb_endpoint ev = {};
	struct mb_endpoint first;
	struct mb_endpoint *other;
	struct mb_end self = {};
	struct mb_sk_state *st;
	__u64 netns = key->netns;
	__u32 apps_tracked;
	__u32 kflags;
	__u8 mode;

	kflags = kernel_flags();
	mode = effective_mode(pod, kflags);
	if (mode == MB_MODE_OFF)
		return 0;

	st = bpf_sk_storage_get(&mb_sk_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		count(MB_CTR_MAP_FULL, 1);
		return 0;
	}
	/* Programs attached at two cgroup levels run twice: act once. */
	if (st->flags & MB_SK_TRACKED)
		return 1;
	/* A socket that connects again after connect(AF_UNSPEC) leaves the maps
	 * under its old connection's key first: its redirect queue (the old
	 * connection's bytes) goes with it, and nothing of the old peer stays. */
	if (st->flags & MB_SK_CLOSED) {
		bpf_map_delete_elem(&mb_senders, &st->self);
		bpf_map_delete_elem(&mb_targets, &st->self);
		st->flags &= ~MB_SK_CLOSED;
	}
	st->self = *key;
	self.active = active;
	self.dest_netns = dest_netns;

	/* Classify: proxy sockets are the proxy UID's active ones and the
	 * accepted ones on the pod's redirect ports. */
	if (active) {
		if ((st->flags & MB_SK_HAVE_UID) && pod->proxy_uid != (__u32)~0 &&
		    st->uid == pod->proxy_uid)
			self.proxy = 1;
	} else {
		__u16 lp = st->self.local_port;

		if (pod->outbound_port && lp == pod->outbound_port)
			self.ports |= MB_EP_OUTBOUND_PORT;
		if (pod->inbound_port && lp == pod->inbound_port)
			self.ports |= MB_EP_INBOUND_PORT;
		self.proxy = self.ports != 0;
	}
	/* `adaptive` admits an app socket only while being in the maps cannot
	 * hurt it: its file is non-blocking (a blocking read() on a member can
	 * fail with EAGAIN on this kernel). A connected socket's file says so
	 * now; an accepted one has no file yet, so its listener's must have
	 * been non-blocking and no socket accepted there turned out blocking. */
	if (mode == MB_MODE_ADAPTIVE && !self.proxy) {
		if (active) {
			self.admitted = !(mb_adaptive_checks & MB_ADAPTIVE_CONNECTED) ||
					file_nonblocking(kernel_sock(sk)) == 1;
		} else {
			__u32 pf = port_flags(netns, st->self.local_port);

			self.admitted = !(mb_adaptive_checks & MB_ADAPTIVE_LISTENER) || port_admits(pf);
			/* The first sockets a port accepts stay out: their file,
			 * read at their first packet (on_packet), says whether
			 * the server accepts non-blocking ones (a Python server
			 * with a timeout on its listener does not). */
			if (!self.admitted && port_learns(pf)) {
				st->flags |= MB_SK_LEARN;
				bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							  BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
			}
		}
	}
	/* App sockets join the maps in `all`, when admitted in `adaptive`
	 * (as redirect targets only where FIONREAD counts redirected bytes),
	 * and as senders in proxy-only where being a member is harmless here. */
	apps_tracked = mode == MB_MODE_ALL || (kflags & MB_KERNEL_SAFE_MEMBER);
	self.can_receive = mode == MB_MODE_ALL || self.proxy ||
		      (self.admitted && !(kflags & MB_KERNEL_HAZARD_FIONREAD));
	self.can_send = mode == MB_MODE_ALL || self.proxy || self.admitted || (kflags & MB_KERNEL_SAFE_MEMBER);

	/* Sockets that cannot have a tracked peer stay out entirely. */
	if (!self.proxy && !apps_tracked && !self.admitted)
		return 0;
	/* An off-node or unregistered peer: only an app's connection that the
	 * pod's outbound REDIRECT may take to its own proxy can pair. */
	if (!self.dest_netns && (!active || self.proxy || !pod->outbound_port))
		return 0;
	if (self.proxy && remote_local && !apps_tracked) {
		/* Its peer is a local app, which stays out unless `adaptive`
		 * admits it: an app accepting from the proxy needs a port that
		 * admits; an app connecting to the proxy established first and
		 * waits already (checked below). */
		if (mode != MB_MODE_ADAPTIVE)
			return 0;
		if (active && (mb_adaptive_checks & MB_ADAPTIVE_LISTENER) &&
		    !port_admits(port_flags(netns, st->self.remote_port)))
			return 0;
	}

	st->seq0 = seq0;
	ev.key = st->self;
	ev.dest_netns = self.dest_netns;
	ev.flags = (active ? MB_EP_ACTIVE : 0) | (self.can_receive ? MB_EP_TARGET : 0) | (self.can_send ? MB_EP_SENDER : 0) | self.ports |
		    (self.proxy ? MB_EP_PROXY : 0) | (self.admitted ? MB_EP_ADAPTIVE : 0);

	other = bpf_map_lookup_elem(&mb_endpoints, ek);
	if (!other) {
		/* The active end establishes first (its callback runs before its
		 * handshake ACK leaves); if it is not waiting, it is not tracked
		 * and nothing will ever join a passive socket here. Only a TCP
		 * Fast Open server establishes first: it stays on the stack. */
		if (!active)
			return 1;
		/* First end: wait, in the maps our own class allows. */
		if (!join_maps(skops, st, self.can_receive, self.can_send))
			return 0;
		long err = bpf_map_update_elem(&mb_endpoints, ek, &ev, BPF_NOEXIST);

		if (err) {
			/* -EEXIST: the other end raced us in and waits itself;
			 * otherwise the map is full. Nobody pairs: stay on the
			 * stack. */
			leave_maps(st);
			count(err == -MB_EEXIST ? MB_CTR_PAIRS_REFUSED : MB_CTR_MAP_FULL, 1);
			return 0;
		}
		st->ep = *ek;
		st->flags |= MB_SK_TRACKED | MB_SK_EP_OWNER | (self.proxy ? MB_SK_PROXY : 0) |
			     (dest_netns ? 0 : MB_SK_WAIT_LOCAL);
		track(skops, st, &self);
		return 1;
	}
	/* A copy: the entry can be deleted under us. */
	first = *other;
	if (first.flags & MB_EP_AMBIGUOUS) {
		count(MB_CTR_PAIRS_REFUSED, 1);
		return 0;
	}
	if (((first.flags & MB_EP_ACTIVE) != 0) == (active != 0)) {
		/* Two sockets claim one connection's name: nobody pairs on it
		 * while the owner lives. */
		other->flags |= MB_EP_AMBIGUOUS;
		count(MB_CTR_PAIRS_REFUSED, 1);
		return 0;
	}
	return join(skops, st, &self, &first, ek);
}

/*
 * A connected socket waits in the maps for its other end; when that end will
 * not join (its passive end stays out: an app `adaptive` leaves out, an
 * unexplained translation, full maps, a pod in `off`; or its peer is off-node
 * and its pod's proxy did not accept it), it leaves the maps again, claiming
 * the endpoint as a joiner would. Nothing was redirected into it (only a
 * joiner writes a pair entry naming it). Staying would cost it more than
 * speed: on this kernel a member's FIONREAD counts only redirected bytes, so
 * the TCP bytes it receives would be invisible to FIONREAD, and nginx, which
 * sizes its reads by FIONREAD, stalls on them.
 */
static __always_inline void decline(const struct mb_endpoint_key *ek)
{
	struct mb_endpoint *e = bpf_map_lookup_elem(&mb_endpoints, ek);
	struct mb_sock_key waiting;

	if (!e || !(e->flags & MB_EP_ACTIVE))
		return;
	waiting = e->key;
	if (bpf_map_delete_elem(&mb_endpoints, ek))
		return; /* claimed by a joiner, or the waiting end closed */
	bpf_map_delete_elem(&mb_senders, &waiting);
	bpf_map_delete_elem(&mb_targets, &waiting);
}

/*
 * A socket of a registered pod has established: its key, where its peer
 * lives and its connection's name, then what it does (establish); a passive
 * socket that does not take its waiting active end declines it.
 */
static __always_inline void on_established(struct bpf_sock_ops *skops, int active)
{
	/* Every ctx field once, before any branch (see sock_key). */
	__u32 snd_una = skops->snd_una, snd_nxt = skops->snd_nxt, rcv_nxt = skops->rcv_nxt;
	__u32 acked = (__u32)skops->bytes_acked, received = (__u32)skops->bytes_received;
	__u64 netns = bpf_get_netns_cookie(skops);
	struct bpf_sock *sk = skops->sk;
	struct mb_endpoint_key ek = {};
	struct mb_sock_key key;
	struct mb_pod *pod, *remote_pod;
	__u32 remote_local, seq0;
	__u64 dest_netns;

	asm volatile("" ::: "memory");
	if (!sk)
		return;
	pod = bpf_map_lookup_elem(&mb_netns, &netns);
	if (!pod)
		return;
	if (!sock_key(skops, netns, &key))
		return;

	/* Where the remote end lives: this pod (loopback, its own IPs),
	 * another registered pod, or somewhere we know nothing of. */
	remote_pod = bpf_map_lookup_elem(&mb_pods, key.remote_ip);
	remote_local = is_loopback(key.remote_ip) || (remote_pod && remote_pod->netns == netns);
	dest_netns = remote_local ? netns : (remote_pod ? remote_pod->netns : 0);

	/* write_seq while no byte went through TCP: the ISN + 1 (the active
	 * side's bytes_acked counts its SYN and any SYN data acknowledged). A
	 * send that began before the socket joined the maps (TCP Fast Open)
	 * moves write_seq without sk_msg seeing it; sk_msg compares. */
	seq0 = active ? snd_una - acked + 1 : snd_nxt;

	/* The connection's name (struct mb_endpoint_key), from either end. */
	if (active) {
		ek.netns = netns;
		__builtin_memcpy(ek.ip, key.local_ip, sizeof(ek.ip));
		ek.port = key.local_port;
		ek.seq_active = seq0;
		ek.seq_passive = rcv_nxt - received;
	} else {
		ek.netns = dest_netns;
		__builtin_memcpy(ek.ip, key.remote_ip, sizeof(ek.ip));
		ek.port = key.remote_port;
		ek.seq_active = rcv_nxt - received;
		ek.seq_passive = seq0;
	}
	if (!establish(skops, sk, pod, &key, &ek, dest_netns, remote_local, seq0, active) && !active)
		decline(&ek);
}

static __always_inline void on_close(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct mb_endpoint *e;
	struct mb_sk_state *st;

	if (!sk)
		return;
	st = bpf_sk_storage_get(&mb_sk_state, sk, 0, 0);
	if (!st || !(st->flags & MB_SK_TRACKED))
		return;
	/* The endpoint before the pair entry: a joiner writes our entry
	 * before it claims the endpoint (see join). */
	if (st->flags & MB_SK_EP_OWNER) {
		e = bpf_map_lookup_elem(&mb_endpoints, &st->ep);
		if (e && key_eq(&e->key, &st->self))
			bpf_map_delete_elem(&mb_endpoints, &st->ep);
	}
	bpf_map_delete_elem(&mb_pairs, &st->self);
	bpf_map_delete_elem(&mb_fed, &st->self);
	release(st);
	/* The connection is over, the socket may not be: disconnected with
	 * connect(AF_UNSPEC), it can connect again. It forgets this connection
	 * (its peer, stickiness, baseline) now, keeping only the UID its next
	 * connect records anew. It stays in the maps: a socket that reached
	 * CLOSE from FIN-WAIT-2 or by a reset still reads what was redirected
	 * into it; a new connection takes it out first (on_established). */
	st->flags = (st->flags & MB_SK_HAVE_UID) | MB_SK_CLOSED;
	st->target = 0;
}

/* listen(): `adaptive` notes whether the listener's file is non-blocking,
 * the evidence it admits accepted sockets on (they have no file until
 * accept()). Every listener on the port must be non-blocking; a veto stays.
 * Noted for every registered pod, so that a pod switched to `adaptive`
 * later (re-registered) knows its listeners too. */
static __always_inline void on_listen(struct bpf_sock_ops *skops)
{
	__u32 lport = skops->local_port;
	__u64 netns = bpf_get_netns_cookie(skops);
	struct bpf_sock *sk = skops->sk;
	struct mb_port_key k = {};
	struct mb_port v = {};
	struct mb_port *old;
	struct mb_pod *pod;

	asm volatile("" ::: "memory");
	if (!sk)
		return;
	pod = bpf_map_lookup_elem(&mb_netns, &netns);
	if (!pod)
		return;
	k.netns = netns;
	k.port = (__u16)lport;
	old = bpf_map_lookup_elem(&mb_ports, &k);
	if (file_nonblocking(kernel_sock(sk)) == 1 && (!old || (old->flags & MB_PORT_LISTENER_NONBLOCK)))
		v.flags = MB_PORT_LISTENER_NONBLOCK;
	if (old)
		v.flags |= old->flags & MB_PORT_ACCEPTED_BLOCKING;
	if (bpf_map_update_elem(&mb_ports, &k, &v, BPF_ANY))
		count(MB_CTR_MAP_FULL, 1);
}

/* What an accepted socket's file says of its port (MB_SK_LEARN). */
static __always_inline void learn(struct bpf_sock_ops *skops, struct bpf_sock *sk, struct mb_sk_state *st)
{
	struct mb_port_key pk = {.netns = st->self.netns, .port = st->self.local_port};
	int nb = file_nonblocking(kernel_sock(sk));
	struct mb_port *p;

	if (nb < 0)
		return; /* not accepted yet (an ACK before accept()): next packet */
	p = bpf_map_lookup_elem(&mb_ports, &pk);
	/* Flags only accumulate (not one atomic step: two learners at once
	 * can lose a bit; a veto lost here is set again by the send guard). */
	if (p)
		p->flags |= nb ? MB_PORT_ACCEPTED_NONBLOCK : MB_PORT_ACCEPTED_BLOCKING;
	st->flags &= ~MB_SK_LEARN;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
}

/* A packet of an admitted app socket is about to leave. If its file turned
 * blocking (sk_msg marked it), it leaves the maps: first as a redirect
 * target (its peer's next redirect fails and goes to TCP), then altogether,
 * which puts its plain TCP functions back; the packet is usually the one its
 * own send put on the stack, so this happens inside that send, before its
 * next read. Not a socket a peer ever redirected into: a redirect chosen
 * before the first step may still be on its way, and dropping the socket
 * drops its redirect queue with it. Such a socket stays a member (no more
 * data is redirected into it; its blocking reads keep the hazard, DESIGN.md). */
static __always_inline void on_packet(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct mb_sk_state *st;

	if (!sk)
		return;
	st = bpf_sk_storage_get(&mb_sk_state, sk, 0, 0);
	if (!st)
		return;
	if (st->flags & MB_SK_WAIT_LOCAL) {
		/* Its first packet completes the handshake: the pod's proxy
		 * accepts it (and joins) when that packet arrives, before this
		 * socket's second packet leaves. Still waiting then: its peer
		 * is off-node and nothing will join it (decline). */
		if (!(st->flags & MB_SK_FIRST_SENT)) {
			st->flags |= MB_SK_FIRST_SENT;
			return;
		}
		st->flags &= ~(MB_SK_WAIT_LOCAL | MB_SK_FIRST_SENT);
		decline(&st->ep);
		if (!(st->flags & MB_SK_ADAPTIVE))
			bpf_sock_ops_cb_flags_set(skops,
						  skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
	}
	if (st->flags & MB_SK_LEARN) {
		learn(skops, sk, st);
		return;
	}
	if (!(st->flags & MB_SK_EVICT))
		return;
	if (st->flags & MB_SK_IN_TARGETS) {
		bpf_map_delete_elem(&mb_targets, &st->self);
		st->flags &= ~MB_SK_IN_TARGETS;
	}
	/* After leaving mb_targets: a peer marks mb_fed before its redirect. */
	if ((mb_adaptive_checks & MB_ADAPTIVE_FED) &&
	    (bpf_map_lookup_elem(&mb_fed, &st->self) || unread_redirected(kernel_sock(sk)) != 0)) {
		st->flags &= ~MB_SK_EVICT;
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
		return;
	}
	bpf_map_delete_elem(&mb_senders, &st->self);
	st->flags &= ~(MB_SK_EVICT | MB_SK_ADAPTIVE);
	release(st);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
	count(MB_CTR_EVICTED, 1);
}

SEC("sockops")
int mb_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		on_connect(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		on_established(skops, 1);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		on_established(skops, 0);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			on_close(skops);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		on_listen(skops);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		on_packet(skops);
		break;
	default:
		break;
	}
	return 1;
}

/*
 * Receive-queue bound. bpf_tcp_ingress() queues redirected data on the
 * target's psock checked against tcp_mem only, never against the receiver's
 * buffer: a stalled reader would let a fast writer pin memory without limit.
 * After each redirect we read the target's queue (CO-RE against the running
 * kernel's BTF; these types are the few fields we need, not the kernel's
 * definitions) and, when it is over its bound, send the direction back to
 * the stack for good: TCP's flow control then holds the writer, and order is
 * kept because the receiver drains its redirect queue before the TCP one.
 */
/* The socket this message was just redirected to, when it holds more than
 * its bound (this message not counted yet); 0 otherwise, and always 0 when
 * the kernel has no msg_tot_len (before 6.14): there the bound is tcp_mem,
 * as selftest reports. */
static __always_inline __u64 receiver_full(struct sk_msg_md *msg)
{
	struct sock___mb *t;
	__u32 queued;
	int rcvbuf = 0;

	if (!bpf_core_field_exists(struct sk_psock___mb, msg_tot_len))
		return 0;
	t = BPF_CORE_READ((struct sk_msg___mb *)msg, sk_redir);
	if (!t)
		return 0;
	queued = queued_at(t);
	if (queued <= MB_QUEUE_FLOOR)
		return 0; /* the common case: no third read */
	if (bpf_core_read(&rcvbuf, sizeof(rcvbuf), &t->sk_rcvbuf) || queued > (__u32)rcvbuf)
		return (__u64)t;
	return 0;
}

/* This socket's write_seq: sk_msg runs inside sendmsg under the socket's
 * lock, so no byte can enter TCP while we look. ~seq0 when unreadable. */
/* Why a sender's message must take TCP although it is paired: 0 none. */
#define MB_STACK_BYTES 1 /* bytes went through TCP without sk_msg (write_seq moved past seq0) */
#define MB_STACK_ZEROCOPY 2 /* SO_ZEROCOPY: its completions come only from TCP's error queue */

/* The kernel's enum sock_flags bit of SO_ZEROCOPY, found by CO-RE. */
enum sock_flags___mb {
	SOCK_ZEROCOPY___mb = 18,
};

/* Read under the sender's lock (sk_msg runs inside sendmsg), so no byte can
 * enter TCP while we look. */
static __always_inline int must_take_stack(struct sock___mb *sk, __u32 seq0)
{
	struct tcp_sock___mb *tp = (void *)sk;
	unsigned long flags = 0;
	__u32 wseq, bit;

	if (!tp || bpf_core_read(&wseq, sizeof(wseq), &tp->write_seq) || wseq != seq0)
		return MB_STACK_BYTES;
	if (!bpf_core_enum_value_exists(enum sock_flags___mb, SOCK_ZEROCOPY___mb))
		return 0;
	bit = bpf_core_enum_value(enum sock_flags___mb, SOCK_ZEROCOPY___mb);
	if (bit >= 64)
		return 0;
	if (bpf_core_field_exists(((struct sock___mb *)tp)->__sk_common.skc_flags)) {
		if (bpf_core_read(&flags, sizeof(flags), &((struct sock___mb *)tp)->__sk_common.skc_flags))
			return 0;
	} else if (bpf_core_field_exists(((struct sock___mb *)tp)->sk_flags)) {
		if (bpf_core_read(&flags, sizeof(flags), &((struct sock___mb *)tp)->sk_flags))
			return 0;
	}
	return (flags >> bit) & 1 ? MB_STACK_ZEROCOPY : 0;
}

/* Which drain conditions may_resume checks: all of them. Only the tests
 * that prove each condition necessary load the program with one removed
 * (meshbypass_ebpf::LoadOptions); the loader never does otherwise. */
const volatile __u32 mb_drain_checks = MB_DRAIN_SENDER_ACKED | MB_DRAIN_RECEIVER_READ;

/*
 * Resuming a direction that went to the stack because its receiver was full.
 * Redirected bytes must not overtake stack bytes, so: every byte the sender
 * gave TCP is acknowledged (snd_una == write_seq: the receiver's TCP has it),
 * the receiver read all of it (copied_seq == rcv_nxt; tcp_bpf reads its
 * redirect queue first, so that one is drained too) and nothing waits in the
 * redirect queue. The sender's lock is held here, so no byte of it can enter
 * TCP meanwhile; values read racily can only be stale in the direction that
 * says "not yet". Only for proxy receivers: a reader blocked inside
 * tcp_recvmsg() for more stack bytes (MSG_WAITALL, SO_RCVLOWAT) would not see
 * redirected ones; proxies read non-blocking (the blocking-read hazard makes
 * that a premise of redirecting into them at all), and SO_RCVLOWAT is checked.
 * On success the sender's new baseline is its write_seq.
 */
static __always_inline int may_resume(struct sock___mb *sk, struct mb_sk_state *st)
{
	struct tcp_sock___mb *snd = (void *)sk;
	struct tcp_sock___mb *rcv = (void *)st->target;
	struct sock___mb *rxsk = (void *)st->target;
	__u32 una = 1, wseq = 0, copied = 1, nxt = 0;
	int lowat = 2;

	if (!snd || !rcv)
		return 0;
	if (bpf_core_read(&una, sizeof(una), &snd->snd_una) ||
	    bpf_core_read(&wseq, sizeof(wseq), &snd->write_seq))
		return 0;
	if ((mb_drain_checks & MB_DRAIN_SENDER_ACKED) && una != wseq)
		return 0;
	/* copied_seq first: it only grows towards rcv_nxt. */
	if (bpf_core_read(&copied, sizeof(copied), &rcv->copied_seq) ||
	    bpf_core_read(&nxt, sizeof(nxt), &rcv->rcv_nxt))
		return 0;
	if ((mb_drain_checks & MB_DRAIN_RECEIVER_READ) && copied != nxt)
		return 0;
	if (bpf_core_read(&lowat, sizeof(lowat), &rxsk->sk_rcvlowat) || lowat > 1)
		return 0;
	if (queued_at(rxsk) != 0)
		return 0;
	st->seq0 = wseq;
	return 1;
}

static __always_inline int pass(struct mb_sk_state *st, __u32 size)
{
	struct mb_counters *c = counters();
	__u32 newly_sticky = 0;

	if (st && !(st->flags & MB_SK_STICKY)) {
		st->flags |= MB_SK_STICKY;
		newly_sticky = 1;
	}
	if (!c)
		return SK_PASS;
	c->v[MB_CTR_STICKY] += newly_sticky;
	c->v[MB_CTR_PASSTHROUGH_MSGS] += 1;
	c->v[MB_CTR_PASSTHROUGH_BYTES] += size;
	return SK_PASS;
}

SEC("sk_msg")
int mb_sk_msg(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	struct sock___mb *ksk;
	struct mb_sk_state *st;
	struct mb_pair *pair;
	__u32 size = msg->size;

	if (!sk)
		return SK_PASS;
	st = bpf_sk_storage_get(&mb_sk_state, sk, 0, 0);
	if (!st)
		return pass(st, size);
	ksk = kernel_sock(sk); /* once per message: every check below reads through it */
	/* Never reorder: once a byte of this direction took the stack, all do,
	 * unless the stack path drained behind a full proxy receiver. */
	if (st->flags & MB_SK_STICKY) {
		if (!(st->flags & MB_SK_RESUMABLE) || !may_resume(ksk, st))
			return pass(0, size);
		st->flags &= ~(MB_SK_STICKY | MB_SK_RESUMABLE);
		st->target = 0;
		count(MB_CTR_RESUMED, 1);
	}
	/* An app socket `adaptive` admitted stays only while its file is
	 * non-blocking (Java's timed connect switches back to blocking): from
	 * the first send that finds it blocking, its sends take TCP and it
	 * leaves the maps (on_packet); an accepted one vetoes its port. */
	if ((st->flags & MB_SK_ADAPTIVE) && (mb_adaptive_checks & MB_ADAPTIVE_SEND) &&
	    file_nonblocking(ksk) != 1) {
		if (!(st->flags & MB_SK_EVICT)) {
			st->flags |= MB_SK_EVICT;
			if (st->flags & MB_SK_PASSIVE) {
				struct mb_port_key pk = {.netns = st->self.netns, .port = st->self.local_port};
				struct mb_port v = {.flags = MB_PORT_ACCEPTED_BLOCKING};

				bpf_map_update_elem(&mb_ports, &pk, &v, BPF_ANY);
			}
		}
		return pass(st, size);
	}
	/* ... and bytes can take the stack without sk_msg: a send that began
	 * before the socket joined the maps finishes on TCP (a blocking
	 * sendto(MSG_FASTOPEN) waits for the handshake, then writes the rest).
	 * And a zerocopy sender needs TCP's completions. */
	switch (must_take_stack(ksk, st->seq0)) {
	case MB_STACK_BYTES:
		count(MB_CTR_STACK_BYTES, 1);
		return pass(st, size);
	case MB_STACK_ZEROCOPY:
		/* A MSG_ZEROCOPY sender waits for completions that a redirect
		 * never produces. */
		count(MB_CTR_ZEROCOPY, 1);
		return pass(st, size);
	}

	if (st->flags & MB_SK_PEER_KNOWN) {
		if (bpf_msg_redirect_hash(msg, &mb_targets, &st->peer, BPF_F_INGRESS) == SK_PASS)
			goto redirected;
		count(MB_CTR_REDIRECT_FAILED, 1);
		return pass(st, size);
	}
	pair = bpf_map_lookup_elem(&mb_pairs, &st->self);
	if (!pair)
		return pass(st, size);
	/* Before the first redirect into an `adaptive` app socket, mark it fed:
	 * it then never drops out of the maps with this message on its way
	 * (it leaves mb_targets first, then looks here: see on_packet). */
	if ((pair->flags & MB_PAIR_PEER_ADAPTIVE) && !(st->flags & MB_SK_FED_PEER)) {
		__u32 one = 1;

		if (bpf_map_update_elem(&mb_fed, &pair->peer, &one, BPF_ANY)) {
			count(MB_CTR_MAP_FULL, 1);
			return pass(st, size);
		}
		st->flags |= MB_SK_FED_PEER;
	}
	/* bpf_msg_redirect_hash returns SK_DROP when the peer is not in mb_targets:
	 * then this message, and the direction, go through the stack. The key
	 * carries the peer's socket cookie: only that very socket matches. */
	if (bpf_msg_redirect_hash(msg, &mb_targets, &pair->peer, BPF_F_INGRESS) != SK_PASS) {
		count(MB_CTR_REDIRECT_FAILED, 1);
		return pass(st, size);
	}
	/* Cache only after a redirect succeeded. */
	st->peer = pair->peer;
	st->flags |= MB_SK_PEER_KNOWN | ((pair->flags & MB_PAIR_PEER_PROXY) ? MB_SK_PEER_PROXY : 0);
redirected:
	{
		struct mb_counters *c = counters();
		/* This message goes to the peer regardless (a redirect cannot be
		 * taken back); the direction's next ones take the stack. */
		__u64 target = receiver_full(msg);
		__u32 full = target != 0;

		if (full) {
			st->flags |= MB_SK_STICKY;
			if (st->flags & MB_SK_PEER_PROXY) {
				st->flags |= MB_SK_RESUMABLE;
				st->target = target;
			}
		}
		if (c) {
			c->v[MB_CTR_REDIRECTED_MSGS] += 1;
			c->v[MB_CTR_REDIRECTED_BYTES] += size;
			c->v[MB_CTR_STICKY] += full;
			c->v[MB_CTR_RECEIVER_FULL] += full;
		}
	}
	return SK_PASS;
}
