"""``rswap doctor``: every kernel feature rswap uses, probed, each ok / missing / fallback."""
from __future__ import annotations

import contextlib
import os
import platform
import tempfile
from collections.abc import Iterable

from rswap_ebpf import paths
from rswap_ebpf.host.driver import FeatureCheck
from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.model.resources import ResourceType

CPU = ResourceType.PROCESSOR_CYCLES


def _ok(feature, detail="", needed=()):
    return FeatureCheck(feature, "ok", detail, "", tuple(needed))


def _missing(feature, detail, fix="", needed=()):
    return FeatureCheck(feature, "missing", detail, fix, tuple(needed))


def _fallback(feature, detail, fix="", needed=()):
    return FeatureCheck(feature, "fallback", detail, fix, tuple(needed))


def _is_mount(path: str, fstype: str) -> bool:
    try:
        with open(os.path.join(paths.root("PROCFS_ROOT"), "self/mounts")) as f:
            return any(line.split()[1] == path and line.split()[2] == fstype for line in f)
    except OSError:
        return False


def check_root() -> FeatureCheck:
    if os.geteuid() == 0:
        return _ok("root", "running as uid 0", [CPU])
    return _missing("root", f"running as uid {os.geteuid()}", "run rswap as root", [CPU])


def check_bcc() -> FeatureCheck:
    from rswap_ebpf.host import bpf

    try:
        bcc = bpf.import_bcc()
    except FeatureMissing as err:
        return _missing("bcc", err.why, err.fix, [CPU])
    return _ok("bcc", f"{getattr(bcc, '__version__', '?')} from {os.path.dirname(bcc.__file__)}", [CPU])


def check_headers() -> FeatureCheck:
    kver = platform.release()
    build = f"/lib/modules/{kver}/build"
    if not os.path.exists(os.path.join(build, "include")):
        return _missing("kernel headers", f"{build} is missing",
                        "apt-get install linux-headers-amd64, then tools/setup links them", [CPU])
    target = os.path.realpath(build)
    if kver.split("-")[0].rsplit(".", 1)[0] not in os.path.basename(target):
        return _fallback("kernel headers", f"{build} -> {target} (another kernel version): "
                         "rswap reads only tracepoint args and helpers, never struct fields",
                         needed=[CPU])
    return _ok("kernel headers", target, [CPU])


def check_bpffs() -> FeatureCheck:
    root = paths.root("BPFFS_ROOT")
    if _is_mount(root, "bpf"):
        return _ok("bpffs", f"mounted on {root}; maps pin under {paths.pin_dir()}", [CPU])
    return _missing("bpffs", f"{root} is not a bpf filesystem",
                    f"mount -t bpf bpf {root} (tools/setup does)", [CPU])


def check_tracefs() -> FeatureCheck:
    for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.exists(os.path.join(p, "events/sched/sched_switch")):
            return _ok("tracefs", f"{p}", [])
    return _fallback("tracefs", "not mounted: only raw tracepoints can be used",
                     "mount -t tracefs tracefs /sys/kernel/tracing")


def check_sched_switch() -> FeatureCheck:
    from rswap_ebpf.host import bpf

    if os.geteuid() != 0:
        return _missing("sched_switch hook", "cannot probe without root", "run as root", [CPU])
    if bpf.raw_tracepoint_supported():
        return _ok("sched_switch hook", "raw_tracepoint:sched_switch", [CPU])
    if bpf.tracepoint_exists("sched", "sched_switch"):
        return _fallback("sched_switch hook", "tracepoint:sched:sched_switch (no raw tracepoints)",
                         needed=[CPU])
    return _missing("sched_switch hook", "no raw tracepoint and no tracefs event",
                    "mount tracefs; kernel needs CONFIG_BPF_EVENTS", [CPU])


def check_cpu_program() -> Iterable[FeatureCheck]:
    """Load the real program once: proves BPF syscall, JIT, compile, pinning and batch drain.

    Its maps are pinned in a directory of doctor's own under bpffs, removed after: a running
    daemon's pins (``paths.pin_dir()``) are never touched.
    """
    from rswap_ebpf.host.cpu.collector import CpuCollector

    if os.geteuid() != 0:
        return [_missing("BPF program load", "needs root", "run as root", [CPU])]
    root = paths.root("BPFFS_ROOT")
    try:
        probe_dir = tempfile.mkdtemp(prefix="rswap-doctor-", dir=root)
    except OSError as err:
        probe_dir = None
        no_pin = _missing("map pinning", f"cannot make a directory under {root}: "
                          f"{err.strerror}", "mount -t bpf bpf /sys/fs/bpf", [CPU])
    try:
        with _pin_dir(probe_dir):
            col = CpuCollector(flush_hz=5, pin=probe_dir is not None)
            try:
                col.open()
            except FeatureMissing as err:
                return [_missing(err.feature, err.why, err.fix, [CPU])]
            try:
                col.drain()
                out = [_ok("BPF program load", f"cpu.bpf.c on {col.attach_point}", [CPU]),
                       _ok("map pinning", f"{len(col.pinned)} maps pinned (in {probe_dir}, "
                           "removed after)", [CPU]) if probe_dir else no_pin]
                out.append(_ok("periodic flush", "software cpu-clock perf event") if col.flush
                           else _fallback("periodic flush", "no software perf events: a task is "
                                          "charged at its next switch only"))
                return out
            finally:
                col.close()
    finally:
        if probe_dir is not None:
            _remove_probe_dir(probe_dir)


@contextlib.contextmanager
def _pin_dir(path: str | None):
    """``paths.pin_dir()`` is ``path`` meanwhile (``$RSWAP_PIN_DIR``, read at every pin)."""
    if path is None:
        yield
        return
    old = os.environ.get("RSWAP_PIN_DIR")
    os.environ["RSWAP_PIN_DIR"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RSWAP_PIN_DIR", None)
        else:
            os.environ["RSWAP_PIN_DIR"] = old


def _remove_probe_dir(path: str) -> None:
    try:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
    except FileNotFoundError:
        pass


def check_cgroups() -> Iterable[FeatureCheck]:
    from rswap_ebpf.host.cgroup import detect_mounts
    from rswap_ebpf.host.cpu.writer import cpu_writer

    try:
        m = detect_mounts()
    except FeatureMissing as err:
        return [_missing("cgroups", err.why, err.fix, [CPU])]
    out = []
    if m.mode == "unified":
        out.append(_ok("cgroup mode", f"unified (cgroup2 at {m.unified})", [CPU]))
    elif m.mode == "hybrid":
        out.append(_fallback("cgroup mode", f"hybrid: cgroup2 at {m.unified} for identity, v1 "
                             f"controllers {', '.join(sorted(m.v1))} for limits", needed=[CPU]))
    else:
        out.append(_fallback("cgroup mode", "legacy v1 only: BPF cannot attribute by cgroup id",
                             needed=[CPU]))
    try:
        w = cpu_writer(m)
        files = "cpu.max/cpu.weight" if w.version == "v2" else "cpu.cfs_quota_us/cpu.shares"
        out.append(_ok("cpu controller", f"cgroup {w.version} ({files})", [CPU]))
    except FeatureMissing as err:
        out.append(_missing("cpu controller", err.why, err.fix, [CPU]))
        return out
    out.append(check_cfs_burst(m))
    out.append(check_throttled_time(m, w))
    out.append(check_cpuset(m))
    return out


def check_throttled_time(mounts, writer) -> FeatureCheck:
    """A throttled task's demand is read as use + the time it waited throttled (drivers.cpu):
    ``cpu.stat``'s ``throttled_time`` (v1, ns) or ``throttled_usec`` (v2)."""
    root = mounts.v1.get("cpu") if writer.version == "v1" else mounts.unified
    dirs = [root] if root else []
    try:
        dirs += sorted(e.path for e in os.scandir(root) if e.is_dir())[:32] if root else []
    except OSError:
        pass
    counts_only = False
    for d in dirs:
        try:
            with open(os.path.join(d, "cpu.stat")) as f:
                keys = {line.split(" ", 1)[0] for line in f}
        except OSError:
            continue
        found = keys & {"throttled_time", "throttled_usec"}
        if found:
            return _ok("throttled time", f"cpu.stat {found.pop()}: a throttled task is seen at "
                       "what it used plus what it waited for", [CPU])
        counts_only = counts_only or "nr_throttled" in keys
    if writer.version == "v2" and "cpu" in mounts.v2_controllers():
        # cgroup2's cpu controller has always counted throttled_usec; no cgroup may enable it yet
        return _ok("throttled time", "cpu.stat throttled_usec (where the cpu controller is "
                   "enabled): a throttled task is seen at what it used plus what it waited for",
                   [CPU])
    detail = ("cpu.stat counts throttled periods but not the time" if counts_only
              else "no cpu.stat with throttling counters found")
    return _fallback("throttled time", f"{detail}: a throttled task's allocation grows x2 a tick "
                     "until its quota no longer binds", "a kernel with CONFIG_CFS_BANDWIDTH",
                     [CPU])


def check_cpuset(mounts) -> FeatureCheck:
    """``critical_isolate`` keeps lower tiers off a critical burst's cores (enforce.cpuset)."""
    from rswap_ebpf.host.cpu.cpuset import allowed_cpus, cpuset_hierarchy

    try:
        version, root = cpuset_hierarchy(mounts)
    except FeatureMissing as err:
        return _missing("cpuset isolation", err.why, err.fix, [CPU])
    allowed = allowed_cpus(version, root)
    if len(allowed) < 2:
        return _missing("cpuset isolation", f"{len(allowed)} CPU: no core to isolate",
                        "a host with 2 or more CPUs", [CPU])
    where = (f"cgroup v1 at {root}: lower tiers get rswap/<task> there" if version == "v1" else
             f"cgroup v2 at {root}: cpuset is enabled for rswap's cgroups when needed")
    return _ok("cpuset isolation", f"[resources.cpu] critical_isolate: {where}; "
               f"{len(allowed)} CPUs, at most {len(allowed) - 1} kept for a critical burst", [CPU])


def check_cfs_burst(mounts) -> FeatureCheck:
    """CFS burst lets a critical task spend quota it saved at a burst's edge (drivers.cpu)."""
    from rswap_ebpf.host.cpu.writer import burst_supported, cpu_writer

    found = burst_supported(mounts)
    if found:
        return _ok("cfs burst", f"{found}: critical tasks carry one quota of unused CPU time", [CPU])
    return _fallback("cfs burst", f"no {cpu_writer(mounts).burst_file} (kernel before 5.14 or "
                     "CONFIG_CFS_BANDWIDTH off): critical tasks get quota without burst credit, "
                     "so a burst's first period can be throttled", "a 5.14+ kernel", [CPU])


def check_pmu() -> FeatureCheck:
    """The CPU vendor, and which PMU events count cache misses here (host.cache.pmu_events)."""
    from rswap_ebpf.host.cache.pmu_events import cpu_identity, select_events
    from rswap_ebpf.host.cache.pmu_events import cpu_id_limit, online_cpus

    vendor, family, model = cpu_identity()
    cpu = f"{vendor or 'unknown vendor'} family {family:#x} model {model:#x}"
    try:
        choice = select_events()
    except FeatureMissing as err:
        return _missing("hardware PMU", f"{cpu}: {err.why}", err.fix, [ResourceType.CACHE])
    pmus = ", ".join(f"{g.pmu} (type {g.misses.type}, {len(g.cpus)} CPUs)" for g in choice.groups)
    return _ok("hardware PMU", f"{cpu}: counts {choice.label} on {pmus}; per-CPU arrays sized "
               f"{cpu_id_limit()} for online CPUs {_cpu_list(online_cpus())}",
               [ResourceType.CACHE])


def _cpu_list(cpus) -> str:
    runs, start = [], None
    for c in sorted(cpus):
        if start is None:
            start = prev = c
        elif c == prev + 1:
            prev = c
        else:
            runs.append((start, prev))
            start = prev = c
    if start is not None:
        runs.append((start, prev))
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def check_resctrl() -> FeatureCheck:
    """resctrl: mounted or not, and what it offers: L3 domains, CDP, shareable ways, MB unit."""
    from rswap_ebpf.host.cache.masks import exclusive_region
    from rswap_ebpf.host.cache.resctrl import MB_PERCENT, read_info

    needed = [ResourceType.CACHE, ResourceType.MEMORY_BANDWIDTH]
    root = paths.root("RESCTRL_ROOT")
    if os.path.exists(os.path.join(root, "schemata")):
        try:
            info = read_info(root)
        except FeatureMissing as err:
            return _missing("resctrl", f"mounted on {root}, but {err.why}", err.fix, needed)
        parts = [f"mounted on {root}", f"{info.num_closids} CLOSIDs"]
        if info.has_l3:
            lo, hi = exclusive_region(info)
            parts.append(f"L3 {info.ways} ways in domains {_ids(info.l3_domains)}"
                         + (" with CDP (L3CODE/L3DATA: the same ways written to both)"
                            if info.cdp else ", CDP off")
                         + (f", shareable_bits {info.shareable_bits:x} (tasks get only the "
                            f"{hi - lo} ways outside them)" if info.shareable_bits else "")
                         + (", sparse masks allowed" if info.sparse_masks else "")
                         + f", min_cbm_bits {info.min_cbm_bits}")
        else:
            parts.append("no L3 allocation")
        if info.has_mb:
            what = ("a throttle level, not a share of bandwidth: rswap steers it from MBM; "
                    "mount with -o mba_MBps for the kernel to" if info.mb_unit == MB_PERCENT
                    else "a rate")
            parts.append(f"MB in {info.mb_unit} ({what}) per domain {_ids(info.mb_domains)}")
        else:
            parts.append("no MB allocation")
        if info.num_rmids:
            parts.append(f"{info.num_rmids} RMIDs (monitoring: {', '.join(info.mon_features)})")
        return _ok("resctrl", "; ".join(parts), needed)
    try:
        with open(os.path.join(paths.root("PROCFS_ROOT"), "filesystems")) as f:
            known = "resctrl" in f.read()
    except OSError:
        known = False
    why = ("the kernel supports it but it is not mounted" if known else
           "the kernel has no resctrl (no Intel RDT / AMD QoS, or CONFIG_X86_CPU_RESCTRL off)")
    fix = "mount -t resctrl resctrl /sys/fs/resctrl" if known else "needs RDT-capable hardware"
    return _missing("resctrl", why, fix, needed)


def _ids(ids) -> str:
    return ",".join(str(i) for i in ids) or "none"


#: what NVML cannot do, said wherever the GPU is reported
NVML_CANNOT = ("NVML cannot cap a process's GPU memory: rswap admits by forecast and holds a "
               "real cap only on MIG instances (a hard partition) and under MPS "
               "(CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, fixed when the client starts)")


def check_nvml(nvml=None) -> FeatureCheck:
    from rswap_ebpf.host.gpu.nvml import NvmlCollector

    gpu = [ResourceType.GPU_MEMORY]
    try:
        with NvmlCollector(nvml) as col:
            sample = col.drain()
            refused = dict(col.missing)
    except FeatureMissing as err:
        return _missing("NVML", f"{err.why}; {NVML_CANNOT}", err.fix, gpu)
    names = []
    for d in sample.devices:
        if d.mig_parent is not None:
            continue
        kids = [m for m in sample.devices if m.mig_parent == d.uuid]
        mode = (f"MIG on, {len(kids)} instance(s): " + ", ".join(
            f"{m.uuid} {m.total_bytes >> 20} MiB" for m in kids) if d.mig_mode else "MIG off")
        names.append(f"{d.uuid} ({d.name}, {d.total_bytes >> 20} MiB, {mode}"
                     + (", MPS clients" if d.mps else "") + ")")
    detail = f"{len(names)} GPU(s): {'; '.join(names)}"
    if refused:
        detail += "; left out: " + "; ".join(f"{k}: {v}" for k, v in refused.items())
    detail += f"; {NVML_CANNOT}"
    if sample.processes_missing:
        return _fallback("NVML", f"{detail}; {sample.processes_missing}",
                         "install the nvidia-ml-py matching the driver", gpu)
    if refused:
        return _fallback("NVML", detail, "give rswap access to every GPU device node", gpu)
    return _ok("NVML", detail, gpu)


def check_block_tracepoints() -> FeatureCheck:
    from rswap_ebpf.host.io.collector import BlockCollector

    io = [ResourceType.STORAGE_IOPS]
    try:
        issue, complete, owner, flags = BlockCollector.probe()
    except FeatureMissing as err:
        return _missing("block tracepoints", err.why, err.fix, io)
    detail = " + ".join(f"tracepoint:{':'.join(p)}" for p in (issue, complete, owner) if p)
    if "-DRSWAP_RQ_NO_BYTES" in flags:
        return _fallback("block tracepoints", detail + " (no bytes field: nr_sector * 512)", needed=io)
    if owner is None:
        return _fallback("block tracepoints", detail + " (no block_getrq: requests kblockd issues "
                         "are charged to it, not to their submitter)", needed=io)
    return _ok("block tracepoints", detail, io)


def check_clsact() -> FeatureCheck:
    """The qdisc kinds the net driver needs, from the kernel's list (no interface is touched)."""
    net = [ResourceType.NETWORK_BANDWIDTH]
    try:
        with open("/proc/net/psched"):
            pass
    except OSError:
        return _missing("tc", "no /proc/net/psched (CONFIG_NET_SCHED off?)", "a kernel with tc", net)
    mods = "/proc/modules"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return _missing("tc clsact + cls_bpf", "pyroute2 is not installed", "run tools/setup", net)
    return _ok("tc clsact + cls_bpf", "pyroute2 present; attach is checked when rswap starts "
               f"(see {mods} or CONFIG_NET_SCH_INGRESS, CONFIG_NET_CLS_BPF, CONFIG_NET_SCH_HTB)", net)


def check_coprocs(config) -> list[FeatureCheck]:
    """Each co-processor the configuration registers: its probe run once, with no task."""
    from rswap_ebpf.host.coproc.device import Coproc, CoprocSpec, ProbeError

    out = []
    for r, opts in sorted(getattr(config, "options", {}).items(), key=lambda kv: kv[0].key):
        if r.type is not ResourceType.SPECIALIZED_COPROC or "probe" not in opts:
            continue
        spec = CoprocSpec.from_options(opts, config.totals.get(r) or 0)
        feature = f"co-processor {spec.name}"
        try:
            Coproc(spec).probe({})
        except ProbeError as err:
            out.append(_missing(feature, str(err), "fix the probe command (rswap_ebpf/coproc.py "
                                "describes what it is sent and must print)", [r]))
            continue
        apply = f", apply {' '.join(spec.apply)!r}" if spec.apply else ", no apply command"
        out.append(_ok(feature, f"{spec.total_units} units; probe {' '.join(spec.probe)!r} "
                       f"answered{apply}", [r]))
    return out


def run_checks(config=None) -> list[FeatureCheck]:
    out = [check_root(), check_bcc(), check_headers(), check_bpffs(), check_tracefs(),
           check_sched_switch()]
    out += list(check_cpu_program())
    out += list(check_cgroups())
    out += [check_pmu(), check_resctrl(), check_nvml()]
    out += [check_block_tracepoints(), check_clsact()]
    if config is not None:
        out += check_coprocs(config)
    return out


def needed_missing(checks: list[FeatureCheck], needed: set) -> list[FeatureCheck]:
    return [c for c in checks if c.status == "missing" and set(c.needed_by) & needed]
