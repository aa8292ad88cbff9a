"""The resctrl enforcer against a fake mount that validates writes as the kernel does.

The fake follows Documentation/arch/x86/resctrl.rst and fs/resctrl's validation
(tests/fakes/resctrl.py says what it reproduces and what it does not).
"""
from __future__ import annotations

import errno
import os

import pytest

from rswap_ebpf.host.cache import resctrl
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.errors import EnforceError, FeatureMissing, RswapError
from tests.fakes.resctrl import FakeResctrl


@pytest.fixture
def fake(tmp_path):
    f = FakeResctrl(str(tmp_path / "resctrl"), cbm_mask="fffff", min_cbm_bits=2,
                    num_closids=16, l3_domains=(0, 1), bw_gran=10, min_bandwidth=10,
                    pids=(1, 100, 200, 300, 301))
    yield f
    f.close()


@pytest.fixture
def journal(tmp_path):
    j = Journal(str(tmp_path / "state" / "journal.jsonl"))
    yield j
    j.close()


def enforcer(fake, journal, **kw):
    e = resctrl.ResctrlEnforcer(journal, root=fake.root, **kw)
    return e


TASKS = {"web": "critical", "db": "critical", "batch": "batch"}


def read(fake, group, name="schemata"):
    d = os.path.join(fake.root, group) if group else fake.root
    with open(os.path.join(d, name)) as f:
        return f.read()


# -- the fake itself reproduces the kernel's validation ---------------------------------------

def test_fake_rejects_non_contiguous_mask(fake):
    fake.mkdir(os.path.join(fake.root, "g"))
    before = read(fake, "g")
    with pytest.raises(OSError) as exc:
        fake.write(os.path.join(fake.root, "g", "schemata"), "L3:0=f0f\n")
    assert exc.value.errno == errno.EINVAL
    assert "non-consecutive" in read(fake, "", "info/last_cmd_status")
    assert read(fake, "g") == before  # a failed write changes nothing


def test_fake_rejects_too_few_bits_out_of_range_and_unknown_resource(fake):
    fake.mkdir(os.path.join(fake.root, "g"))
    path = os.path.join(fake.root, "g", "schemata")
    for bad, why in (("L3:0=1\n", "at least 2 bits"), ("L3:0=fffff0\n", "out of range"),
                     ("MB:0=5\n", "out of range"), ("XX:0=1\n", "Unknown or unsupported")):
        with pytest.raises(OSError):
            fake.write(path, bad)
        assert why in read(fake, "", "info/last_cmd_status")


def test_unknown_domain_is_einval_with_last_cmd_status_ok(fake):
    # parse_line() returns -EINVAL for a domain id it does not know and puts no message: the
    # status was cleared when the command began, so it reads "ok" beside the error.
    fake.mkdir(os.path.join(fake.root, "g"))
    path = os.path.join(fake.root, "g", "schemata")
    with pytest.raises(OSError):
        fake.write(path, "L3:0=1\n")
    with pytest.raises(OSError) as exc:
        fake.write(path, "L3:7=ff\n")
    assert exc.value.errno == errno.EINVAL
    assert read(fake, "", "info/last_cmd_status") == "ok\n"


def test_unknown_domain_refusal_names_the_errno_not_ok(fake, journal):
    e = enforcer(fake, journal)
    e.open(TASKS, mount=False)
    with pytest.raises(EnforceError) as exc:
        e._write_schemata(os.path.join(fake.root, "rswap-web", "schemata"), "L3:7=ff\n")
    assert "Invalid argument" in str(exc.value) and ": ok" not in str(exc.value)
    e.restore()


def test_missing_newline_leaves_the_status_stale_so_the_enforcer_adds_it(fake, journal):
    fake.mkdir(os.path.join(fake.root, "g"))
    path = os.path.join(fake.root, "g", "schemata")
    with pytest.raises(OSError):
        fake.write(path, "L3:0=1\n")           # leaves "Need at least 2 bits ..."
    with pytest.raises(OSError):
        fake.write(path, "L3:0=ff")            # refused before the status is cleared
    assert "at least 2 bits" in read(fake, "", "info/last_cmd_status")   # stale
    e = enforcer(fake, journal)
    e.open(TASKS, mount=False)
    e._write_schemata(os.path.join(fake.root, "rswap-web", "schemata"), "L3:0=ff")
    assert read(fake, "rswap-web").startswith("L3:0=000ff")
    e.restore()


def test_fake_rounds_mb_up_to_granularity_and_pads_like_show_doms(fake):
    fake.mkdir(os.path.join(fake.root, "g"))
    fake.write(os.path.join(fake.root, "g", "schemata"), "MB:0=35;1=90\nL3:0=ff\n")
    assert read(fake, "g") == "L3:0=000ff;1=fffff\nMB:0= 40;1= 90\n"


def test_fake_runs_out_of_closids(tmp_path):
    f = FakeResctrl(str(tmp_path / "r"), num_closids=2)
    try:
        f.mkdir(os.path.join(f.root, "a"))
        with pytest.raises(OSError) as exc:
            f.mkdir(os.path.join(f.root, "b"))
        assert exc.value.errno == errno.ENOSPC
    finally:
        f.close()


# -- bounds read from info/ -------------------------------------------------------------------

def test_read_info(fake):
    info = resctrl.read_info(fake.root)
    assert (info.cbm_mask, info.ways, info.min_cbm_bits, info.num_closids) == (0xFFFFF, 20, 2, 16)
    assert info.l3_domains == (0, 1) and info.mb_domains == (0, 1)
    assert (info.bw_gran, info.min_bw) == (10, 10)
    assert "mbm_total_bytes" in info.mon_features
    assert info.mb_value(35) == 40 and info.mb_value(3) == 10 and info.mb_value(250) == 100


def test_missing_resctrl_says_so(tmp_path, monkeypatch):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "filesystems").write_text("nodev\tsysfs\nnodev\tbpf\n\text4\n")
    monkeypatch.setenv("RSWAP_PROCFS_ROOT", str(proc))
    with pytest.raises(FeatureMissing) as exc:
        resctrl.ensure_mounted(None, str(tmp_path / "nothing"))
    assert "resctrl" in str(exc.value) and "/proc/filesystems" in str(exc.value)


# -- masks ------------------------------------------------------------------------------------

def _bits(mask):
    return bin(mask).count("1")


def _contiguous(mask):
    low = mask & -mask
    return mask and (mask + low) & mask == 0


def test_three_tasks_give_valid_non_overlapping_critical_masks(fake, journal):
    e = enforcer(fake, journal)
    assert e.open(TASKS, mount=False) == "per-task"
    e.apply(ways={"web": 8, "db": 6, "batch": 4})
    masks = e.masks()  # as the (fake) kernel now shows them
    web, db, batch = masks["rswap-web"], masks["rswap-db"], masks["rswap-batch"]
    assert (_bits(web), _bits(db), _bits(batch)) == (8, 6, 4)
    for m in (web, db, batch, masks[""]):
        assert _contiguous(m) and _bits(m) >= 2 and m & ~0xFFFFF == 0
    assert web & db == 0
    assert (web | db) & batch == 0
    assert (web | db) & masks[""] == 0  # isolate_default: the host's other threads keep out
    # Every L3 domain gets the same mask.
    assert resctrl.parse_schemata(read(fake, "rswap-web"))["L3"] == {0: f"{web:05x}", 1: f"{web:05x}"}


def test_swap_two_ways_from_batch_to_critical_rewrites_both_in_one_tick(fake, journal):
    e = enforcer(fake, journal)
    e.open(TASKS, mount=False)
    e.apply(ways={"web": 8, "db": 6, "batch": 4})
    before = {g: read(fake, g) for g in ("rswap-web", "rswap-db", "rswap-batch")}
    writes = e.apply(ways={"web": 10, "batch": 2})  # one tick: the pool's transfer of 2 ways
    written = {os.path.basename(os.path.dirname(p)) for p, _ in writes}
    assert {"rswap-web", "rswap-batch"} <= written
    assert "rswap-db" not in written
    masks = e.masks()
    assert _bits(masks["rswap-web"]) == 10 and _bits(masks["rswap-batch"]) == 2
    assert masks["rswap-web"] & masks["rswap-batch"] == 0
    assert masks["rswap-web"] & masks["rswap-db"] == 0
    assert read(fake, "rswap-db") == before["rswap-db"]
    # The shrinking group is written before the growing one.
    assert [os.path.basename(os.path.dirname(p)) for p, _ in writes].index("rswap-batch") < \
        [os.path.basename(os.path.dirname(p)) for p, _ in writes].index("rswap-web")


def test_below_min_cbm_bits_shares_the_leftover(fake, journal):
    e = enforcer(fake, journal)
    e.open(TASKS, mount=False)
    e.apply(ways={"web": 10, "db": 7, "batch": 0})
    m = e.masks()
    assert _bits(m["rswap-batch"]) == 3  # the unallocated ways, not a zero mask
    assert m["rswap-batch"] & (m["rswap-web"] | m["rswap-db"]) == 0
    # One way left over (< min_cbm_bits 2): the gap widens into the batch ways, not critical ones.
    e2 = resctrl.layout_masks(e.info, {"w": 10, "d": 7, "b": 2, "n": 0},
                              {"w": "critical", "d": "critical", "b": "batch", "n": "normal"})
    assert _bits(e2["n"]) == 2 and e2["n"] & (e2["w"] | e2["d"]) == 0 and e2["n"] & e2["b"]


def test_too_many_ways_are_refused_before_writing(fake, journal):
    e = enforcer(fake, journal)
    e.open(TASKS, mount=False)
    with pytest.raises(RswapError):
        e.apply(ways={"web": 15, "db": 6})
    assert read(fake, "rswap-web").startswith("L3:0=fffff")


def test_memory_bandwidth_percent_rounded_and_clamped(fake, journal):
    e = enforcer(fake, journal)
    e.open(TASKS, mount=False)
    e.apply(percent={"web": 55, "db": 31, "batch": 3})
    assert "MB:0= 60;1= 60" in read(fake, "rswap-web")
    assert "MB:0= 40;1= 40" in read(fake, "rswap-db")
    assert "MB:0= 10;1= 10" in read(fake, "rswap-batch")  # min_bandwidth, not 3


def test_per_tier_groups_when_closids_are_short(tmp_path, journal):
    f = FakeResctrl(str(tmp_path / "r"), num_closids=3, min_cbm_bits=1)
    try:
        e = resctrl.ResctrlEnforcer(journal, root=f.root)
        mode = e.open({"a": "critical", "b": "critical", "c": "batch", "d": "batch"}, mount=False)
        assert mode == "per-tier"
        assert set(e.groups) == {"rswap-critical", "rswap-batch"}
        e.apply(ways={"a": 3, "b": 2, "c": 4, "d": 1})
        m = e.masks()
        assert _bits(m["rswap-critical"]) == 5 and _bits(m["rswap-batch"]) == 5
        assert m["rswap-critical"] & m["rswap-batch"] == 0
        e.restore()
    finally:
        f.close()


def test_place_moves_threads_and_restore_puts_everything_back_byte_for_byte(fake, journal):
    admin = os.path.join(fake.root, "admin")
    fake.mkdir(admin)
    fake.write(os.path.join(admin, "schemata"), "L3:0=3;1=3\nMB:0=50;1=50\n")
    fake.write(os.path.join(admin, "tasks"), "300")
    original = {g: read(fake, g) for g in ("", "admin")}
    original_tasks = {g: read(fake, g, "tasks") for g in ("", "admin")}
    e = enforcer(fake, journal)
    e.open(TASKS, mount=False)
    e.apply(ways={"web": 8, "db": 6, "batch": 4}, percent={"web": 70, "db": 20, "batch": 10})
    assert e.place("web", [100]) == 1
    assert e.place("batch", [200, 300]) == 2
    assert fake.group_of(100) == "rswap-web" and fake.group_of(300) == "rswap-batch"
    assert read(fake, "") != original[""]  # the default group was narrowed
    e.apply(ways={"web": 10, "batch": 2})
    e.restore()
    assert sorted(os.listdir(fake.root)) == sorted(["info", "mon_data", "mon_groups", "admin",
                                                     "schemata", "tasks", "cpus", "cpus_list",
                                                     "mode", "size"])
    assert {g: read(fake, g) for g in ("", "admin")} == original
    assert {g: read(fake, g, "tasks") for g in ("", "admin")} == original_tasks
    assert not os.path.exists(journal.path)


def test_restore_from_a_fresh_process_view_uses_only_the_journal(fake, journal):
    """A crashed daemon: a new Journal object on the same file undoes everything."""
    original = read(fake, "")
    e = enforcer(fake, journal)
    e.open(TASKS, mount=False)
    e.apply(ways={"web": 8, "db": 6, "batch": 4})
    e.place("db", [200])
    journal.close()
    report = Journal(journal.path).restore()
    assert not report.failed
    assert read(fake, "") == original and fake.group_of(200) == ""
    assert not any(n.startswith("rswap-") for n in os.listdir(fake.root))


def test_admin_group_of_the_same_name_is_not_taken_over(fake, journal):
    fake.mkdir(os.path.join(fake.root, "rswap-web"))
    e = enforcer(fake, journal)
    with pytest.raises(EnforceError):
        e.open(TASKS, mount=False)


def test_kernel_refusal_is_reported_with_last_cmd_status(fake, journal):
    e = enforcer(fake, journal)
    e.open(TASKS, mount=False)
    with pytest.raises(EnforceError) as exc:
        e._write_schemata(os.path.join(fake.root, "rswap-web", "schemata"), "L3:0=101\n")
    assert "non-consecutive" in str(exc.value)
    e.restore()


def test_proc_resctrl_groups_is_trusted_only_for_the_kernels_own_mount(fake, journal, tmp_path,
                                                                      monkeypatch):
    # A kernel built with resctrl (Debian's 6.1) has /proc/<tid>/cpu_resctrl_groups and says
    # "res:/" there while nothing is mounted: for another tree that is not the answer.
    proc = tmp_path / "proc"
    (proc / "300").mkdir(parents=True)
    (proc / "300" / "cpu_resctrl_groups").write_text("res:/\nmon:/\n")
    (proc / "mounts").write_text("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n")
    monkeypatch.setenv("RSWAP_PROCFS_ROOT", str(proc))
    fake.mkdir(os.path.join(fake.root, "ops"))
    fake.write(os.path.join(fake.root, "ops", "tasks"), "300")
    assert enforcer(fake, journal).group_of_tid(300) == "ops"  # from the tasks files
    (proc / "mounts").write_text(f"resctrl {fake.root} resctrl rw,relatime 0 0\n")
    assert enforcer(fake, journal).group_of_tid(300) == ""  # the kernel's mount: /proc answers


# -- CDP, RMIDs, AMD masks, shareable_bits ----------------------------------------------------

def test_cdp_mount_writes_the_same_ways_to_l3code_and_l3data(tmp_path, journal):
    """resctrl.rst, CDP: info/L3CODE and info/L3DATA replace info/L3 with half the CLOSIDs;
    schemata carries an L3CODE and an L3DATA line, and an L3 line is an unknown resource."""
    fake = FakeResctrl(str(tmp_path / "r"), cbm_mask="7ff", num_closids=16, cdp=True,
                       pids=(1, 100))
    try:
        info = resctrl.read_info(fake.root)
        assert info.cdp and info.has_l3 and info.l3_names == ("L3CODE", "L3DATA")
        assert info.num_closids == 8 and info.l3_domains == (0, 1)
        fake.mkdir(os.path.join(fake.root, "g"))
        with pytest.raises(OSError):
            fake.write(os.path.join(fake.root, "g", "schemata"), "L3:0=f\n")
        assert "Unknown or unsupported resource name 'L3'" in read(fake, "", "info/last_cmd_status")
        fake.rmdir(os.path.join(fake.root, "g"))
        e = enforcer(fake, journal)
        e.open(TASKS, mount=False)
        e.apply(ways={"web": 3, "db": 2, "batch": 2})
        web = resctrl.parse_schemata(read(fake, "rswap-web"))
        assert web["L3CODE"] == web["L3DATA"] == {0: "01c", 1: "01c"}   # after db's 2 ways
        assert e.masks()["rswap-batch"] == 0x600
        e.restore()
        assert not fake.groups.keys() - {""}
    finally:
        fake.close()


def test_cdp_halves_the_closids_so_many_tasks_go_per_tier(tmp_path, journal):
    fake = FakeResctrl(str(tmp_path / "r"), num_closids=4, cdp=True)   # 2 CLOSIDs under CDP
    try:
        e = enforcer(fake, journal)
        with pytest.raises(FeatureMissing):     # 3 tiers need 3 groups + the default
            e.open(TASKS, mount=False)
    finally:
        journal.restore()
        fake.close()


def test_rmid_exhaustion_is_enospc_out_of_rmids(tmp_path, journal):
    fake = FakeResctrl(str(tmp_path / "r"), num_closids=16, num_rmids=3)   # default + 2
    try:
        e = enforcer(fake, journal)
        with pytest.raises(FeatureMissing) as exc:
            e.open(TASKS, mount=False)
        assert exc.value.feature == "resctrl RMIDs" and "Out of RMIDs" in str(exc.value)
    finally:
        journal.restore()
        fake.close()


def test_limbo_rmids_are_ebusy_and_open_waits_for_them(tmp_path, journal):
    """A group removed while its RMID still tags cache lines leaves the RMID in limbo; mkdir is
    EBUSY (not ENOSPC) until the kernel frees it, as after a crash-restart of rswap."""
    fake = FakeResctrl(str(tmp_path / "r"), num_closids=16, num_rmids=4)
    try:
        for g in ("a", "b", "c"):
            fake.mkdir(os.path.join(fake.root, g))
            fake.set_occupancy(g, 0, 8 * 2**20)
            fake.rmdir(os.path.join(fake.root, g))
        assert fake.limbo == 3
        with pytest.raises(OSError) as exc:
            fake.mkdir(os.path.join(fake.root, "x"))
        assert exc.value.errno == errno.EBUSY
        assert read(fake, "", "info/last_cmd_status") == "Out of RMIDs\n"
        # The enforcer retries while RMIDs are in limbo; here they age out after one wait.
        e = enforcer(fake, journal)
        waits = []
        e._sleep = lambda s: (waits.append(s), fake.clear_limbo())
        assert e.open(TASKS, mount=False) == "per-task"
        assert waits and set(fake.groups) == {"", "rswap-web", "rswap-db", "rswap-batch"}
        e.restore()
        # Limbo that never clears: an error naming limbo, after limbo_wait_s.
        for g in ("a", "b", "c"):
            fake.mkdir(os.path.join(fake.root, g))
            fake.set_occupancy(g, 0, 8 * 2**20)
            fake.rmdir(os.path.join(fake.root, g))
        e = enforcer(fake, journal)
        e.limbo_wait_s = 0.0
        with pytest.raises(FeatureMissing) as exc:
            e.open(TASKS, mount=False)
        assert "limbo" in str(exc.value) and "max_threshold_occupancy" in str(exc.value)
    finally:
        journal.restore()
        fake.close()


def test_zen_sparse_masks_and_min_cbm_bits_zero(tmp_path):
    """AMD (arch_has_sparse_bitmasks, arch_has_empty_bitmaps): sparse_masks 1, min_cbm_bits 0, so
    non-contiguous and empty masks are legal there and refused on Intel."""
    amd = FakeResctrl(str(tmp_path / "amd"), cbm_mask="ffff", vendor="amd")
    intel = FakeResctrl(str(tmp_path / "intel"), cbm_mask="ffff")
    try:
        info = resctrl.read_info(amd.root)
        assert info.sparse_masks and info.min_cbm_bits == 0
        amd.mkdir(os.path.join(amd.root, "g"))
        amd.write(os.path.join(amd.root, "g", "schemata"), "L3:0=f0f;1=0\n")
        assert read(amd, "g").startswith("L3:0=0f0f;1=0000")
        resctrl.check_mask(info, 0xf0f)
        resctrl.check_mask(info, 0)
        iinfo = resctrl.read_info(intel.root)
        intel.mkdir(os.path.join(intel.root, "g"))
        for bad in ("L3:0=f0f\n", "L3:0=0\n"):
            with pytest.raises(OSError):
                intel.write(os.path.join(intel.root, "g", "schemata"), bad)
        for mask in (0xf0f, 0):
            with pytest.raises(RswapError):
                resctrl.check_mask(iinfo, mask)
    finally:
        amd.close()
        intel.close()


def test_shareable_bits_are_never_a_tasks_exclusive_ways(tmp_path, journal):
    """resctrl.rst: shareable_bits are ways other agents (I/O, GPU) may use: rswap's exclusive
    masks stay clear of them; only the shared (default) mask covers them."""
    fake = FakeResctrl(str(tmp_path / "r"), cbm_mask="fff", shareable_bits="c00",
                       pids=(1, 100))
    try:
        e = enforcer(fake, journal)
        e.open(TASKS, mount=False)
        assert resctrl.read_info(fake.root).shareable_bits == 0xc00
        with pytest.raises(RswapError):
            e.apply(ways={"web": 6, "db": 2, "batch": 3})   # 11 > the 10 non-shareable ways
        e.apply(ways={"web": 4, "db": 2, "batch": 2})
        m = e.masks()
        for g in ("rswap-web", "rswap-db", "rswap-batch"):
            assert m[g] & 0xc00 == 0, (g, hex(m[g]))
        assert m["rswap-batch"] == 0x300
        # The 2 free ways; with the shareable ones the mask would be 0xcc0, not contiguous on
        # Intel, so the default group keeps the free ways only.
        assert m[""] == 0x0c0
    finally:
        journal.restore()
        fake.close()
