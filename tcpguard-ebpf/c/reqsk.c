// SPDX-License-Identifier: GPL-2.0
/*
 * tcpguard_reqsk: TC ingress classifier that turns an ACK whose own cookie the XDP program
 * accepted into a connection, through the kfunc bpf_sk_assign_tcp_reqsk.
 *
 * Written in C because Rust eBPF code cannot call a kfunc yet (rustc emits no BTF for extern
 * declarations). The XDP program has already verified the cookie: the kfunc checks none, so
 * this program acts only on an ACK that carries XDP's record (tcpguard-common's CookieAck, in
 * the metadata in front of the packet), and never drops anything: the kernel decides.
 */
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

/* tcpguard-common/src/cookie_ack.rs: CookieAck, COOKIE_ACK_MAGIC and the flag bits. */
struct tcpguard_cookie_ack {
	__u32 magic;
	__u32 rcv_tsval;
	__u32 rcv_tsecr;
	__u16 mss;
	__u8 rcv_wscale;
	__u8 snd_wscale;
	__u8 flags;
	__u8 pad[3];
};
_Static_assert(sizeof(struct tcpguard_cookie_ack) == 20, "CookieAck is 20 bytes");

#define COOKIE_ACK_MAGIC 0x6b636774 /* "tgck" read as a little-endian u32 */
#define COOKIE_ACK_ECN (1 << 0)
#define COOKIE_ACK_WSCALE (1 << 1)
#define COOKIE_ACK_SACK (1 << 2)
#define COOKIE_ACK_TIMESTAMPS (1 << 3)

/*
 * The kernel's struct bpf_tcp_req_attrs (Linux 6.9+, checked against this kernel's BTF). The
 * kfunc refuses any other size and non-zero reserved bytes.
 */
struct bpf_tcp_req_attrs {
	__u32 rcv_tsval;
	__u32 rcv_tsecr;
	__u16 mss;
	__u8 rcv_wscale;
	__u8 snd_wscale;
	__u8 ecn_ok;
	__u8 wscale_ok;
	__u8 sack_ok;
	__u8 tstamp_ok;
	__u8 usec_ts_ok;
	__u8 reserved[3];
};
_Static_assert(sizeof(struct bpf_tcp_req_attrs) == 20, "bpf_tcp_req_attrs is 20 bytes");

/*
 * aya matches the kfunc's signature against the kernel's BTF and refuses a pointer to a struct
 * that is only forward-declared: the empty body gives struct sock a BTF type of its own.
 */
struct sock {};

extern int bpf_sk_assign_tcp_reqsk(struct __sk_buff *skb, struct sock *sk,
				   struct bpf_tcp_req_attrs *attrs, int attrs__sz) __ksym;

/* Indices of REQSK_RESULTS; tcpguard/src/reqsk.rs reads them by the same numbers. */
enum reqsk_result {
	RESULT_ASSIGNED = 0,	  /* the kfunc hung a request socket on the skb */
	RESULT_NO_LISTENER = 1,	  /* no socket for the 4-tuple */
	RESULT_REFUSED = 2,	  /* the kfunc returned an error */
	RESULT_UNPARSED = 3,	  /* a record, but no TCP ACK the program can read */
	RESULT_KERNEL_SOCKET = 4, /* the kernel already has a connection for the 4-tuple */
	RESULT_COUNT = 5,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RESULT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} REQSK_RESULTS SEC(".maps");

/*
 * Failures go to the daemon's log with their 4-tuple and error code, as the Rust programs'
 * rare events do, but not through aya-log: a fixed record (tcpguard-common's RareEvent) in a
 * ring of this object's own,
 * RARE_EVENTS, which the daemon reads and logs through its logger. The first failure of a
 * kind, then at most one record a second per CPU and kind, carrying how many were held back
 * since (tcpguard-common's LogLimit). The Rust programs log through aya-log, which has no C
 * side; its record format is internal to it.
 */
struct tcpguard_flow_key {
	__u8 client_addr[16]; /* IPv4 in the first four bytes, the rest zero */
	__u8 server_addr[16];
	__u16 client_port; /* host byte order */
	__u16 server_port;
	__u8 family; /* 4 or 6 */
	__u8 pad[3];
} __attribute__((aligned(8)));

struct tcpguard_rare_event {
	struct tcpguard_flow_key key;
	__s32 error;
	__u8 kind;
	__u8 level;
	__u8 pad[2];
	__u64 held_back;
};
_Static_assert(sizeof(struct tcpguard_rare_event) == 56, "RareEvent is 56 bytes");

/* tcpguard-common: rare_event::REQSK_*, RARE_*, RARE_LOG_INTERVAL_NS, RARE_EVENT_RING_BYTES. */
#define RARE_REQSK_NO_LISTENER 5
#define RARE_REQSK_REFUSED 6
#define RARE_ERROR 1
#define RARE_WARN 2
#define RARE_LOG_INTERVAL_NS 1000000000ULL

struct log_limit {
	__u64 last_ns;
	__u64 held_back;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 15);
} RARE_EVENTS SEC(".maps");

/* Indexed by kind - RARE_REQSK_NO_LISTENER. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct log_limit);
} RARE_LIMITS SEC(".maps");

/* Records the event unless one of its kind went out from this CPU less than a second ago. */
static __always_inline void record(const struct tcpguard_flow_key *key, __u8 kind, __u8 level,
				   int error)
{
	__u32 index = kind - RARE_REQSK_NO_LISTENER;
	struct log_limit *limit = bpf_map_lookup_elem(&RARE_LIMITS, &index);
	struct tcpguard_rare_event *event;
	__u64 now = bpf_ktime_get_ns();

	if (!limit)
		return;
	if (limit->last_ns != 0 && now - limit->last_ns < RARE_LOG_INTERVAL_NS) {
		limit->held_back += 1;
		return;
	}
	event = bpf_ringbuf_reserve(&RARE_EVENTS, sizeof(*event), 0);
	if (!event) {
		limit->held_back += 1; /* the daemon is behind: told with the next record */
		return;
	}
	event->key = *key;
	event->error = error;
	event->kind = kind;
	event->level = level;
	event->pad[0] = event->pad[1] = 0;
	event->held_back = limit->held_back;
	bpf_ringbuf_submit(event, 0);
	limit->last_ns = now;
	limit->held_back = 0;
}

struct vlan_tag {
	__be16 tci;
	__be16 proto;
};

static __always_inline int count(enum reqsk_result result)
{
	__u32 key = result;
	__u64 *value = bpf_map_lookup_elem(&REQSK_RESULTS, &key);

	if (value)
		*value += 1; /* per-CPU: no other writer */
	return TC_ACT_OK;
}

SEC("classifier")
int tcpguard_reqsk(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct tcpguard_cookie_ack *ack = (void *)(long)skb->data_meta;
	struct bpf_sock_tuple tuple = {};
	struct bpf_tcp_req_attrs attrs = {};
	struct tcpguard_flow_key key = {};
	struct bpf_sock *skc;
	struct tcp_sock *tp;
	struct tcphdr *th;
	__u32 tuple_size;
	__u16 proto;
	void *cursor;
	int err;

	/* Without XDP's record the packet is none of this program's business. */
	if ((void *)(ack + 1) > data || ack->magic != COOKIE_ACK_MAGIC)
		return TC_ACT_OK;

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return count(RESULT_UNPARSED);
	proto = eth->h_proto;
	cursor = eth + 1;
	/*
	 * Before TC ingress the kernel usually moves the outer tag to skb->vlan_tci already; what
	 * stays in-band (a second tag, or both when it did not) is skipped here. A frame that still
	 * has a tag in-band has skb->protocol 802.1Q, which the kfunc refuses: counted as refused.
	 */
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		struct vlan_tag *tag = cursor;
		if ((void *)(tag + 1) > data_end)
			return count(RESULT_UNPARSED);
		proto = tag->proto;
		cursor = tag + 1;
	}

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = cursor;
		if ((void *)(iph + 1) > data_end || iph->ihl < 5 || iph->protocol != IPPROTO_TCP)
			return count(RESULT_UNPARSED);
		/* A fragment has no TCP header to trust. */
		if (iph->frag_off & bpf_htons(0x3fff))
			return count(RESULT_UNPARSED);
		th = cursor + iph->ihl * 4;
		tuple.ipv4.saddr = iph->saddr;
		tuple.ipv4.daddr = iph->daddr;
		tuple_size = sizeof(tuple.ipv4);
		__builtin_memcpy(key.client_addr, &iph->saddr, 4);
		__builtin_memcpy(key.server_addr, &iph->daddr, 4);
		key.family = 4;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6h = cursor;
		/* XDP gives a record only to a TCP header right after the fixed header. */
		if ((void *)(ip6h + 1) > data_end || ip6h->nexthdr != IPPROTO_TCP)
			return count(RESULT_UNPARSED);
		th = (void *)(ip6h + 1);
		__builtin_memcpy(tuple.ipv6.saddr, &ip6h->saddr, sizeof(tuple.ipv6.saddr));
		__builtin_memcpy(tuple.ipv6.daddr, &ip6h->daddr, sizeof(tuple.ipv6.daddr));
		tuple_size = sizeof(tuple.ipv6);
		__builtin_memcpy(key.client_addr, &ip6h->saddr, 16);
		__builtin_memcpy(key.server_addr, &ip6h->daddr, 16);
		key.family = 6;
	} else {
		return count(RESULT_UNPARSED);
	}
	if ((void *)(th + 1) > data_end)
		return count(RESULT_UNPARSED);
	/* Only the handshake's final ACK completes a connection from a cookie. */
	if (!th->ack || th->syn || th->rst)
		return count(RESULT_UNPARSED);
	if (tuple_size == sizeof(tuple.ipv4)) {
		tuple.ipv4.sport = th->source;
		tuple.ipv4.dport = th->dest;
	} else {
		tuple.ipv6.sport = th->source;
		tuple.ipv6.dport = th->dest;
	}
	key.client_port = bpf_ntohs(th->source);
	key.server_port = bpf_ntohs(th->dest);

	/*
	 * The kfunc wants the listener. Any other socket for this 4-tuple means the kernel owns the
	 * flow: leave it alone. That is an established one when XDP judged this segment before the
	 * stack had built the connection from an earlier one that returned the cookie (both in one
	 * NAPI batch), or a request socket of the kernel's own because it saw the SYN.
	 */
	skc = bpf_skc_lookup_tcp(skb, &tuple, tuple_size, BPF_F_CURRENT_NETNS, 0);
	if (!skc) {
		/* The listener closed after XDP checked the cookie: the kernel answers with a RST. */
		record(&key, RARE_REQSK_NO_LISTENER, RARE_WARN, 0);
		return count(RESULT_NO_LISTENER);
	}
	if (skc->state != BPF_TCP_LISTEN) {
		bpf_sk_release(skc);
		return count(RESULT_KERNEL_SOCKET);
	}
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp) {
		bpf_sk_release(skc);
		return count(RESULT_NO_LISTENER);
	}

	attrs.rcv_tsval = ack->rcv_tsval;
	/* The SYN-ACK's TSval: the kernel derives the connection's timestamp offset from it. */
	attrs.rcv_tsecr = ack->rcv_tsecr;
	attrs.mss = ack->mss;
	/* The kernel does not recompute it: it must be the one the SYN-ACK advertised. */
	attrs.rcv_wscale = ack->rcv_wscale;
	attrs.snd_wscale = ack->snd_wscale;
	attrs.ecn_ok = !!(ack->flags & COOKIE_ACK_ECN);
	attrs.wscale_ok = !!(ack->flags & COOKIE_ACK_WSCALE);
	attrs.sack_ok = !!(ack->flags & COOKIE_ACK_SACK);
	attrs.tstamp_ok = !!(ack->flags & COOKIE_ACK_TIMESTAMPS);
	attrs.usec_ts_ok = 0;

	err = bpf_sk_assign_tcp_reqsk(skb, (struct sock *)tp, &attrs, sizeof(attrs));
	bpf_sk_release(skc);
	if (err < 0) {
		record(&key, RARE_REQSK_REFUSED, RARE_ERROR, err);
		return count(RESULT_REFUSED);
	}
	return count(RESULT_ASSIGNED);
}

char LICENSE[] SEC("license") = "GPL";
