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
        if (classid)
            skb->priority = *classid;
    }
    return TC_ACT_OK;
}

int rswap_tc_ingress(struct __sk_buff *skb)
{
    count(skb, 0, RSWAP_DIR_INGRESS);
    return TC_ACT_OK;
}
