/* Cache misses and references per process (tgid) and per cgroup2 id.
 *
 * Each CPU has two hardware counters opened by the loader into BPF_PERF_ARRAYs,
 * keyed by CPU id (sized RSWAP_NR_CPUS = the largest online/possible id + 1).
 * Which events is the loader's choice by vendor (host/cache/pmu_events.py): LLC
 * misses/references on Intel, L3 misses/references as the core sees them on AMD
 * Zen (raw ls_dmnd_fills_from_sys), else the generic events (L2 on AMD).
 *
 * Multiplexing: a counter shares the PMU with other events and runs only part of
 * the time; bpf_perf_event_value gives time_enabled and time_running, and each
 * slice's growth is scaled by d(enabled) / d(running), as perf does for a count.
 * rswap_pmu_mux keeps running totals of both for the miss counter, so user space
 * can say how much was extrapolated.  At sched_switch the task switching out is `current`;
 * the counters' growth since this CPU's previous read is charged to it, so
 * only helpers and tracepoint context are used (no task_struct field).
 *
 * Sampling (-DRSWAP_PMU_SAMPLE=N, N > 1): only every Nth slice per CPU is
 * measured, at both its ends, and charged N times over: an unbiased estimate
 * that costs two counter reads per N switches instead of one per switch.
 *
 * Build variants (flags, never string replacement):
 *   RSWAP_RAW_TP        attach as raw tracepoint (else tracepoint:sched:sched_switch)
 *   RSWAP_PMU_REPLAY    read the counters from the `rswap_pmu_replay` array that
 *                       user space fills (tests and the benchmark on hosts without a PMU)
 *   RSWAP_PMU_NO_READ   do everything except the counter read (the benchmark's baseline)
 *   RSWAP_PMU_TEST_RUN  export the handler as `rswap_pmu_switch` for BPF_PROG_TEST_RUN
 *                       instead of auto-attaching it
 */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf.h>
#include "rswap.h"

#ifndef RSWAP_PMU_SAMPLE
#define RSWAP_PMU_SAMPLE 1
#endif
#ifndef RSWAP_NR_CPUS
#define RSWAP_NR_CPUS 256
#endif

struct rswap_pmu_cpu {
    u64 misses;     /* counter values at this CPU's last read */
    u64 refs;
    u64 switches;
    u64 armed;      /* 1: the slice now running started with a read */
    u64 m_enabled;  /* time_enabled / time_running of each counter at that read */
    u64 m_running;
    u64 r_enabled;
    u64 r_running;
};

struct rswap_pmu_read {
    u64 misses, refs;
    u64 m_enabled, m_running, r_enabled, r_running;
};

struct rswap_pmu_counts {
    u64 misses;
    u64 refs;
    u64 slices;     /* measured slices (each charged RSWAP_PMU_SAMPLE times) */
};

#ifdef RSWAP_PMU_REPLAY
BPF_ARRAY(rswap_pmu_replay, u64, 4);          /* misses, refs, enabled ns, running ns */
#else
BPF_PERF_ARRAY(rswap_pmu_misses, RSWAP_NR_CPUS);
BPF_PERF_ARRAY(rswap_pmu_refs, RSWAP_NR_CPUS);
#endif
BPF_PERCPU_ARRAY(rswap_pmu_cpu, struct rswap_pmu_cpu, 1);
BPF_PERCPU_HASH(rswap_pmu_task, u32, struct rswap_pmu_counts, RSWAP_MAX_TASKS);
BPF_PERCPU_HASH(rswap_pmu_cgroup, u64, struct rswap_pmu_counts, RSWAP_MAX_CGROUPS);
BPF_PERCPU_ARRAY(rswap_pmu_stats, u64, RSWAP_STAT_MAX);
BPF_ARRAY(rswap_pmu_mux, u64, 2);             /* miss counter: [0] enabled ns, [1] running ns */

static __always_inline void pmu_bump_stat(int idx)
{
    u64 *v = rswap_pmu_stats.lookup(&idx);
    if (v)
        (*v)++;
}

/* Both counters of this CPU with their enabled/running times; -1 when a read
 * fails (counter not enabled on it). */
static __always_inline int read_counters(struct rswap_pmu_read *r)
{
#if defined(RSWAP_PMU_NO_READ)
    __builtin_memset(r, 0, sizeof(*r));
    return 0;
#elif defined(RSWAP_PMU_REPLAY)
    int i0 = 0, i1 = 1, i2 = 2, i3 = 3;
    u64 *m = rswap_pmu_replay.lookup(&i0);
    u64 *f = rswap_pmu_replay.lookup(&i1);
    u64 *e = rswap_pmu_replay.lookup(&i2);
    u64 *n = rswap_pmu_replay.lookup(&i3);
    if (!m || !f || !e || !n)
        return -1;
    r->misses = *m;
    r->refs = *f;
    r->m_enabled = r->r_enabled = *e;
    r->m_running = r->r_running = *n;
    return 0;
#else
    struct bpf_perf_event_value v = {};
    if (rswap_pmu_misses.perf_counter_value(CUR_CPU_IDENTIFIER, &v, sizeof(v)) != 0)
        return -1;
    r->misses = v.counter;
    r->m_enabled = v.enabled;
    r->m_running = v.running;
    if (rswap_pmu_refs.perf_counter_value(CUR_CPU_IDENTIFIER, &v, sizeof(v)) != 0)
        return -1;
    r->refs = v.counter;
    r->r_enabled = v.enabled;
    r->r_running = v.running;
    return 0;
#endif
}

/* delta * enabled / running without overflowing u64: both times are first cut to
 * at most 2^20 (the ratio keeps 6 significant digits). Not multiplexed (running
 * == enabled) or no times (replay without them): the delta as it is. */
static __always_inline u64 scale(u64 delta, u64 enabled, u64 running)
{
    if (running == 0 || running >= enabled)
        return delta;
    u64 q = (enabled >> 20) + 1;
    u64 e = enabled / q, r = running / q;
    if (r == 0)
        return delta;
    return delta * e / r;
}

static __always_inline void charge(struct rswap_pmu_counts *add)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid == 0)          /* the idle task */
        return;
    struct rswap_pmu_counts *t = rswap_pmu_task.lookup(&tgid);
    if (!t) {
        if (rswap_pmu_task.update(&tgid, add) != 0)
            pmu_bump_stat(RSWAP_STAT_TASK_FULL);
    } else {
        t->misses += add->misses;
        t->refs += add->refs;
        t->slices += add->slices;
    }
    u64 cgid = bpf_get_current_cgroup_id();
    struct rswap_pmu_counts *c = rswap_pmu_cgroup.lookup(&cgid);
    if (!c) {
        if (rswap_pmu_cgroup.update(&cgid, add) != 0)
            pmu_bump_stat(RSWAP_STAT_CGROUP_FULL);
    } else {
        c->misses += add->misses;
        c->refs += add->refs;
        c->slices += add->slices;
    }
}

static __always_inline void on_switch(void)
{
    int zero = 0;
    struct rswap_pmu_cpu *st = rswap_pmu_cpu.lookup(&zero);
    if (!st)
        return;
    st->switches++;
    struct rswap_pmu_read now = {};
    int have = 0;
    if (st->armed) {
        st->armed = 0;
        if (read_counters(&now) == 0) {
            have = 1;
            /* A counter that went backwards was reset (CPU offline, replay restart). */
            if (now.misses >= st->misses && now.refs >= st->refs &&
                now.m_enabled >= st->m_enabled && now.m_running >= st->m_running &&
                now.r_enabled >= st->r_enabled && now.r_running >= st->r_running) {
                u64 me = now.m_enabled - st->m_enabled, mr = now.m_running - st->m_running;
                u64 re = now.r_enabled - st->r_enabled, rr = now.r_running - st->r_running;
                struct rswap_pmu_counts add = {
                    .misses = scale(now.misses - st->misses, me, mr) * RSWAP_PMU_SAMPLE,
                    .refs = scale(now.refs - st->refs, re, rr) * RSWAP_PMU_SAMPLE,
                    .slices = 1,
                };
                charge(&add);
                int i0 = 0, i1 = 1;
                u64 *e = rswap_pmu_mux.lookup(&i0);
                u64 *n = rswap_pmu_mux.lookup(&i1);
                if (e && n && mr <= me) {
                    __sync_fetch_and_add(e, me);
                    __sync_fetch_and_add(n, mr);
                }
            } else {
                pmu_bump_stat(RSWAP_STAT_STALE);
            }
        }
    }
#if RSWAP_PMU_SAMPLE > 1
    if (st->switches % RSWAP_PMU_SAMPLE != 0)
        return;
#endif
    if (!have && read_counters(&now) != 0)
        return;
    st->misses = now.misses;
    st->refs = now.refs;
    st->m_enabled = now.m_enabled;
    st->m_running = now.m_running;
    st->r_enabled = now.r_enabled;
    st->r_running = now.r_running;
    st->armed = 1;
}

#if defined(RSWAP_PMU_TEST_RUN)
int rswap_pmu_switch(struct bpf_raw_tracepoint_args *ctx)
{
    on_switch();
    return 0;
}
#elif defined(RSWAP_RAW_TP)
RAW_TRACEPOINT_PROBE(sched_switch)
{
    on_switch();
    return 0;
}
#else
TRACEPOINT_PROBE(sched, sched_switch)
{
    on_switch();
    return 0;
}
#endif
