/* Bytes and packets per cgroup2 id, interface and direction, from tc clsact
 * (cls_bpf, direct-action), and HTB classification by the socket's cgroup.
 *
 * Egress: bpf_skb_cgroup_id() is the cgroup of the socket that sent the
 * packet.  When rswap_net_class maps that cgroup to an HTB class id, the
 * program writes it to skb->priority; HTB takes skb->priority as the class
 * when it names one of its leaf classes, so no other filter is needed.
 *
 * Ingress: at tc ingress the packet has not been matched to a socket yet
 * (skb->sk is NULL), so there is no cgroup to read.  Ingress bytes are
 * counted per interface under cgroup id 0.
 *
 * Ingress shaping (an ifb the interface's ingress is redirected to, with its
 * own HTB): the class can only be chosen per flow.  Egress learns, for every
 * packet of a classified cgroup, its flow (remote addr/port, local addr/port,
 * protocol) -> class id in rswap_net_flow (LRU); ingress looks the reversed
 * flow up and writes the class id to skb->priority, which survives the mirred
 * redirect and selects the task's class on the ifb.  A flow the task has not
 * sent on yet (a first SYN from outside) is not shaped.  IPv4, and IPv6
 * without extension headers; TCP and UDP.  The ingress program returns
 * TC_ACT_UNSPEC so the next filter (the mirred redirect) still runs.  Flow
 * learning is compiled in only with -DRSWAP_NET_FLOWS (ingress shaping on).
 *
 * Only __sk_buff (uapi, rewritten by the verifier) and helpers are used.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include "rswap.h"

#define RSWAP_DIR_INGRESS 0
#define RSWAP_DIR_EGRESS 1

struct net_key {
    u64 cgid;
    u32 ifindex;
    u32 dir;
};

struct net_val {
    u64 packets;
    u64 bytes;
};

BPF_PERCPU_HASH(rswap_net_bytes, struct net_key, struct net_val, RSWAP_MAX_CGROUPS);
BPF_HASH(rswap_net_class, u64, u32, RSWAP_MAX_CGROUPS);
BPF_PERCPU_ARRAY(rswap_net_stats, u64, RSWAP_STAT_MAX);

#ifndef RSWAP_MAX_FLOWS
#define RSWAP_MAX_FLOWS 16384
#endif

struct flow_key {
    u8 raddr[16];
    u8 laddr[16];
    u16 rport;
    u16 lport;
    u8 proto;
    u8 pad[3];
};

BPF_TABLE("lru_hash", struct flow_key, u32, rswap_net_flow, RSWAP_MAX_FLOWS);

#define RSWAP_ETH_HLEN 14
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define RSWAP_BE16(x) __builtin_bswap16(x)
#else
#define RSWAP_BE16(x) (x)
#endif

/* The packet's flow, seen from this host: 0 when it is one (TCP/UDP over IPv4,
 * or IPv6 with no extension header, not a later fragment). */
static __always_inline int flow_of(struct __sk_buff *skb, struct flow_key *k, int egress)
{
    u32 l4;
    u8 proto;
    if (skb->protocol == RSWAP_BE16(0x0800)) {
        u8 vihl;
        u16 frag;
        if (bpf_skb_load_bytes(skb, RSWAP_ETH_HLEN, &vihl, 1) ||
            bpf_skb_load_bytes(skb, RSWAP_ETH_HLEN + 6, &frag, 2) ||
            bpf_skb_load_bytes(skb, RSWAP_ETH_HLEN + 9, &proto, 1))
            return -1;
        if (RSWAP_BE16(frag) & 0x1fff)
            return -1;
        if (bpf_skb_load_bytes(skb, RSWAP_ETH_HLEN + (egress ? 16 : 12), k->raddr, 4) ||
            bpf_skb_load_bytes(skb, RSWAP_ETH_HLEN + (egress ? 12 : 16), k->laddr, 4))
            return -1;
        l4 = RSWAP_ETH_HLEN + (vihl & 0xf) * 4;
    } else if (skb->protocol == RSWAP_BE16(0x86DD)) {
        if (bpf_skb_load_bytes(skb, RSWAP_ETH_HLEN + 6, &proto, 1) ||
            bpf_skb_load_bytes(skb, RSWAP_ETH_HLEN + (egress ? 24 : 8), k->raddr, 16) ||
            bpf_skb_load_bytes(skb, RSWAP_ETH_HLEN + (egress ? 8 : 24), k->laddr, 16))
            return -1;
        l4 = RSWAP_ETH_HLEN + 40;
    } else {
        return -1;
    }
    if (proto != 6 && proto != 17)
        return -1;
    u16 ports[2];
    if (bpf_skb_load_bytes(skb, l4, ports, 4))
        return -1;
    k->rport = egress ? ports[1] : ports[0];
    k->lport = egress ? ports[0] : ports[1];
    k->proto = proto;
    return 0;
}

static __always_inline void count(struct __sk_buff *skb, u64 cgid, u32 dir)
{
    struct net_key key = {.cgid = cgid, .ifindex = skb->ifindex, .dir = dir};
    struct net_val *v = rswap_net_bytes.lookup(&key);
    if (v) {
        v->packets++;
        v->bytes += skb->len;
        return;
    }
    struct net_val init = {.packets = 1, .bytes = skb->len};
    if (rswap_net_bytes.insert(&key, &init) != 0) {
        v = rswap_net_bytes.lookup(&key);
        if (v) {
            v->packets++;
            v->bytes += skb->len;
        } else {
            int idx = RSWAP_STAT_CGROUP_FULL;
            u64 *s = rswap_net_stats.lookup(&idx);
            if (s)
                (*s)++;
        }
    }
}

int rswap_tc_egress(struct __sk_buff *skb)
{
    u64 cgid = bpf_skb_cgroup_id(skb);
    count(skb, cgid, RSWAP_DIR_EGRESS);
    if (cgid) {
        u32 *classid = rswap_net_class.lookup(&cgid);
        if (classid) {
            skb->priority = *classid;
#ifdef RSWAP_NET_FLOWS
            struct flow_key k = {};
            if (flow_of(skb, &k, 1) == 0) {
                u32 *known = rswap_net_flow.lookup(&k);
                if (!known || *known != *classid)
                    rswap_net_flow.update(&k, classid);
            }
#endif
        }
    }
    return TC_ACT_OK;
}

int rswap_tc_ingress(struct __sk_buff *skb)
{
    count(skb, 0, RSWAP_DIR_INGRESS);
#ifdef RSWAP_NET_FLOWS
    struct flow_key k = {};
    if (flow_of(skb, &k, 0) == 0) {
        u32 *classid = rswap_net_flow.lookup(&k);
        if (classid)
            skb->priority = *classid;
    }
#endif
    return TC_ACT_UNSPEC;
}
