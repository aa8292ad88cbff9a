/* On-CPU time per cgroup2 id, and per process (tgid) for the processes user space watches.
 *
 * Each CPU remembers when it last switched.  At every sched_switch the time since then is
 * charged to the task switching out, which is `current` while the tracepoint runs, so no
 * task_struct field is read and no per-thread start-time entry can go stale.  A low-rate
 * software perf event (the "flush") charges the running task the same way, so a busy loop that
 * is never switched out is charged too.
 *
 * The hot path stays in one per-CPU array entry (`rswap_cpu_pending`): a few cgroup slots with
 * running sums.  A switch whose cgroup is already in a slot adds to it and touches no hash; only
 * a cgroup that is not there evicts a slot into `rswap_cgroup_ns`.  At each drain user space runs
 * `rswap_cpu_sync` on every CPU (BPF_PROG_TEST_RUN with BPF_F_TEST_RUN_ON_CPU: an IPI, so it
 * cannot interleave with the switch program, which runs with interrupts off): it charges the
 * running task up to now and moves every slot into the hashes, so a drain reads every
 * nanosecond up to that moment, once.  Per-tgid sums are kept only for tgids in
 * `rswap_cpu_watch`, looked up only when the tgid on a CPU changes.
 *
 * RSWAP_CPU_DIRECT builds the fallback for kernels without BPF_F_TEST_RUN_ON_CPU (before 5.10):
 * every switch charges the hashes directly.
 *
 * RSWAP_RUNQ builds in the switch half of the run-queue delay probe (rswap.h), off until
 * user space sets `rswap_cpu_ctl.runq` and attaches the wakeup programs: then one program per
 * switch serves both collectors.  The delay ends at the switch that runs the task and is read
 * at the one that switches it out, when its cgroup is `current`'s, the cgroup this program has
 * just looked up: it is counted in that cgroup's slot, beside its CPU time, and reaches the
 * histogram hashes when the slot is evicted or synced.
 */
#include <uapi/linux/ptrace.h>
#include "rswap.h"

struct rswap_cpu_slot {
    u64 cgid;
    u64 ns;
#ifdef RSWAP_RUNQ
    u64 runq_ns;                /* run-queue delays of this cgroup's tasks, and their ... */
    u64 runq[RSWAP_RUNQ_SLOTS]; /* ... counts by log2 slot, not yet in the hashes */
#endif
};

struct rswap_cpu_pending {
    u64 start;                  /* when this CPU last charged (0: never) */
    u32 tgid;                   /* the last tgid charged here (0: none) ... */
    u32 tgid_watched;           /* ... whether it is in rswap_cpu_watch ... */
    u64 tgid_ns;                /* ... and its running sum */
    u32 next;                   /* the slot the next miss evicts */
    u32 pad;
    u64 switched;               /* when this CPU last switched (the run-queue half) */
    struct rswap_cpu_slot slot[RSWAP_CPU_SLOTS];
};

struct rswap_cpu_ctl {
    u64 watched;                /* entries in rswap_cpu_watch (0: skip per-tgid accounting) */
    u64 runq;                   /* 1: the run-queue half runs (RSWAP_RUNQ builds only) */
};

BPF_PERCPU_ARRAY(rswap_cpu_pending, struct rswap_cpu_pending, 1);
BPF_ARRAY(rswap_cpu_ctl, struct rswap_cpu_ctl, 1);
BPF_HASH(rswap_cpu_watch, u32, u8, RSWAP_MAX_WATCHED);
BPF_PERCPU_HASH(rswap_task_ns, u32, u64, RSWAP_MAX_TASKS);
BPF_PERCPU_HASH(rswap_cgroup_ns, u64, u64, RSWAP_MAX_CGROUPS);
BPF_PERCPU_ARRAY(rswap_stats, u64, RSWAP_STAT_MAX);

static __always_inline void bump_stat(int idx)
{
    u64 *v = rswap_stats.lookup(&idx);
    if (v)
        (*v)++;
}

static __always_inline void add_cgroup(u64 cgid, u64 ns)
{
    if (ns == 0)
        return;
    u64 *c = rswap_cgroup_ns.lookup(&cgid);
    if (c)
        *c += ns;
    else if (rswap_cgroup_ns.update(&cgid, &ns) != 0)
        bump_stat(RSWAP_STAT_CGROUP_FULL);
}

static __always_inline void add_task(u32 tgid, u64 ns)
{
    if (ns == 0)
        return;
    u64 *t = rswap_task_ns.lookup(&tgid);
    if (t)
        *t += ns;
    else if (rswap_task_ns.update(&tgid, &ns) != 0)
        bump_stat(RSWAP_STAT_TASK_FULL);
}

/* Move one slot's sums into the hashes. */
static __always_inline void flush_slot(struct rswap_cpu_slot *s)
{
    add_cgroup(s->cgid, s->ns);
    s->ns = 0;
#ifdef RSWAP_RUNQ
    if (s->runq_ns == 0)
        return;
    u64 ns = s->runq_ns;
    for (int b = 0; b < RSWAP_RUNQ_SLOTS; b++) {
        if (s->runq[b]) {
            runq_add(s->cgid, b, s->runq[b], ns);
            ns = 0;             /* the sum goes in once, with the first slot */
            s->runq[b] = 0;
        }
    }
    s->runq_ns = 0;
#endif
}

/* Move every running sum of this CPU into the hashes; the slots keep their cgroups, and the
 * next tgid is looked up again (the watch list may have changed). */
static __always_inline void flush_all(struct rswap_cpu_pending *p)
{
#pragma unroll
    for (int i = 0; i < RSWAP_CPU_SLOTS; i++)
        flush_slot(&p->slot[i]);
    if (p->tgid_watched)
        add_task(p->tgid, p->tgid_ns);
    p->tgid = 0;
    p->tgid_watched = 0;
    p->tgid_ns = 0;
}

/* Charge `current` the time since this CPU last charged; at a switch (`switching`) also read
 * the run-queue delay it waited before it was switched in (`runnable`: it is still runnable). */
static __always_inline void charge_current(struct rswap_cpu_pending *p,
                                           struct rswap_cpu_ctl *ctl, int switching, int runnable)
{
    u64 now = bpf_ktime_get_ns();
    u64 last = p->start;
    p->start = now;
    u64 delta = now - last;
    if (last == 0) {
        delta = 0;
    } else if (delta > RSWAP_MAX_DELTA_NS) {
        bump_stat(RSWAP_STAT_STALE);
        delta = 0;
    }
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    u64 runq_delay = 0;
#ifdef RSWAP_RUNQ
    if (switching) {
        u64 in_ts = p->switched;
        p->switched = now;
        if (ctl->runq && tgid != 0)
            runq_delay = runq_switch_out((u32)pid_tgid, runnable, in_ts, now);
    }
#endif
    if (tgid == 0)              /* the idle task */
        return;
    if (delta == 0 && runq_delay == 0)
        return;
    u64 cgid = bpf_get_current_cgroup_id();

#ifdef RSWAP_CPU_DIRECT
    add_cgroup(cgid, delta);
#ifdef RSWAP_RUNQ
    if (runq_delay)
        runq_add(cgid, runq_bucket(runq_delay), 1, runq_delay);
#endif
    if (ctl->watched && rswap_cpu_watch.lookup(&tgid))
        add_task(tgid, delta);
#else
    u32 hit = 0;
#pragma unroll
    for (int i = 0; i < RSWAP_CPU_SLOTS; i++) {
        if (!hit && p->slot[i].cgid == cgid)
            hit = i + 1;
    }
    struct rswap_cpu_slot *s;
    if (hit) {
        s = &p->slot[(hit - 1) & (RSWAP_CPU_SLOTS - 1)];
        s->ns += delta;
    } else {
        u32 v = p->next & (RSWAP_CPU_SLOTS - 1);
        p->next = v + 1;
        s = &p->slot[v];
        flush_slot(s);
        s->cgid = cgid;
        s->ns = delta;
    }
#ifdef RSWAP_RUNQ
    if (runq_delay) {
        s->runq[runq_bucket(runq_delay)]++;
        s->runq_ns += runq_delay;
    }
#endif

    if (ctl->watched == 0)
        return;
    if (tgid != p->tgid) {
        if (p->tgid_watched)
            add_task(p->tgid, p->tgid_ns);
        p->tgid = tgid;
        p->tgid_ns = 0;
        p->tgid_watched = rswap_cpu_watch.lookup(&tgid) != NULL;
    }
    if (p->tgid_watched)
        p->tgid_ns += delta;
#endif
}

static __always_inline void on_event(int switching, int runnable, int sync)
{
    int zero = 0;
    struct rswap_cpu_pending *p = rswap_cpu_pending.lookup(&zero);
    struct rswap_cpu_ctl *ctl = rswap_cpu_ctl.lookup(&zero);
    if (!p || !ctl)
        return;
    charge_current(p, ctl, switching, runnable);
    if (sync)
        flush_all(p);
}

#ifdef RSWAP_RAW_TP
/* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
 *          unsigned int prev_state): the collector builds RSWAP_RUNQ here from Linux 5.18 */
RAW_TRACEPOINT_PROBE(sched_switch)
{
#ifdef RSWAP_RUNQ
    on_event(1, (u8)ctx->args[0] || (u32)ctx->args[3] == 0, 0);
#else
    on_event(1, 0, 0);
#endif
    return 0;
}
#else
TRACEPOINT_PROBE(sched, sched_switch)
{
    on_event(1, args->prev_state == 0 || args->prev_state == RSWAP_TASK_REPORT_MAX, 0);
    return 0;
}
#endif

#ifdef RSWAP_RUNQ
/* The wakeup half (rswap.h).  Not bcc's auto-attached TRACEPOINT_PROBE: the collector attaches
 * these only while a run-queue collector shares this program.  bcc generates the argument structs in the main file only, so each
 * program that runs the half defines them. */
int rswap_runq_wakeup(struct tracepoint__sched__sched_wakeup *args)
{
    runq_enqueued(args->pid);
    return 0;
}

int rswap_runq_wakeup_new(struct tracepoint__sched__sched_wakeup_new *args)
{
    runq_enqueued(args->pid);
    return 0;
}
#endif

int rswap_cpu_flush(struct bpf_perf_event_data *ctx)
{
    on_event(0, 0, 0);
    return 0;
}

/* Loaded as a raw tracepoint program but never attached: user space runs it on each CPU. */
int rswap_cpu_sync(struct bpf_raw_tracepoint_args *ctx)
{
    on_event(0, 0, 1);
    return 0;
}
