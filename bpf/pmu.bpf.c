/* Cache misses and LLC references per process (tgid) and per cgroup2 id.
 *
 * Each CPU has a hardware counter (PERF_COUNT_HW_CACHE_MISSES, and
 * PERF_COUNT_HW_CACHE_REFERENCES: LLC references on x86) opened by the loader
 * into a BPF_PERF_ARRAY.  At sched_switch the task switching out is `current`;
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
};

struct rswap_pmu_counts {
    u64 misses;
    u64 refs;
    u64 slices;     /* measured slices (each charged RSWAP_PMU_SAMPLE times) */
};

#ifdef RSWAP_PMU_REPLAY
BPF_ARRAY(rswap_pmu_replay, u64, 2);          /* [0] misses, [1] refs */
#else
BPF_PERF_ARRAY(rswap_pmu_misses, RSWAP_NR_CPUS);
BPF_PERF_ARRAY(rswap_pmu_refs, RSWAP_NR_CPUS);
#endif
BPF_PERCPU_ARRAY(rswap_pmu_cpu, struct rswap_pmu_cpu, 1);
BPF_PERCPU_HASH(rswap_pmu_task, u32, struct rswap_pmu_counts, RSWAP_MAX_TASKS);
BPF_PERCPU_HASH(rswap_pmu_cgroup, u64, struct rswap_pmu_counts, RSWAP_MAX_CGROUPS);
BPF_PERCPU_ARRAY(rswap_pmu_stats, u64, RSWAP_STAT_MAX);

static __always_inline void pmu_bump_stat(int idx)
{
    u64 *v = rswap_pmu_stats.lookup(&idx);
    if (v)
        (*v)++;
}

/* Both counters of this CPU; 0 when a read fails (counter not enabled on it). */
static __always_inline int read_counters(u64 *misses, u64 *refs)
{
#if defined(RSWAP_PMU_NO_READ)
    *misses = 0;
    *refs = 0;
    return 0;
#elif defined(RSWAP_PMU_REPLAY)
    int i0 = 0, i1 = 1;
    u64 *m = rswap_pmu_replay.lookup(&i0);
    u64 *r = rswap_pmu_replay.lookup(&i1);
    if (!m || !r)
        return -1;
    *misses = *m;
    *refs = *r;
    return 0;
#else
    struct bpf_perf_event_value v = {};
    if (rswap_pmu_misses.perf_counter_value(CUR_CPU_IDENTIFIER, &v, sizeof(v)) != 0)
        return -1;
    *misses = v.counter;
    if (rswap_pmu_refs.perf_counter_value(CUR_CPU_IDENTIFIER, &v, sizeof(v)) != 0)
        return -1;
    *refs = v.counter;
    return 0;
#endif
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
    u64 misses = 0, refs = 0;
    int have = 0;
    if (st->armed) {
        st->armed = 0;
        if (read_counters(&misses, &refs) == 0) {
            have = 1;
            /* A counter that went backwards was reset (CPU offline, replay restart). */
            if (misses >= st->misses && refs >= st->refs) {
                struct rswap_pmu_counts add = {
                    .misses = (misses - st->misses) * RSWAP_PMU_SAMPLE,
                    .refs = (refs - st->refs) * RSWAP_PMU_SAMPLE,
                    .slices = 1,
                };
                charge(&add);
            } else {
                pmu_bump_stat(RSWAP_STAT_STALE);
            }
        }
    }
#if RSWAP_PMU_SAMPLE > 1
    if (st->switches % RSWAP_PMU_SAMPLE != 0)
        return;
#endif
    if (!have && read_counters(&misses, &refs) != 0)
        return;
    st->misses = misses;
    st->refs = refs;
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
