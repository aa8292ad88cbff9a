"""Configuration validation: one clear error naming the field, before anything is applied."""
import pytest

from rswap_ebpf.runtime import config
from rswap_ebpf.errors import ConfigError
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.model.limits import Priority

CPU = ResourceType.PROCESSOR_CYCLES

GOOD = """
[daemon]
interval = 0.5
window = 3
[resources.cpu]
total = 1500
[[task]]
name = "web"
priority = "critical"
cgroup = "system.slice/nginx.service"
cpu = { min = 100, max = 1200 }
[[task]]
name = "batch"
priority = "batch"
command = ["make", "-j2"]
"""


def test_good_config_parses():
    c = config.parse(GOOD)
    assert c.daemon.interval == 0.5 and c.daemon.window == 3
    assert c.totals == {CPU: 1500}
    web, batch = c.tasks
    assert web.priority is Priority.CRITICAL and web.limits[CPU].max_units == 1200
    assert batch.command == ("make", "-j2") and batch.priority is Priority.BATCH


def test_embedded_default_is_the_demo():
    c = config.load()
    assert [t.name for t in c.tasks] == ["web", "batch"]
    assert all(t.command for t in c.tasks)


@pytest.mark.parametrize("text,field", [
    ("[daemon]\ninterval = -1", "daemon.interval"),
    ("[daemon]\nintervall = 1", "daemon.intervall"),
    ("[resources.bogus]\ntotal = 1", "resources.bogus"),
    ("[resources.cpu]\ntotal = -5", "resources.cpu.total"),
    ("[resources.cpu]\ntotal = 'lots'", "resources.cpu.total"),
    ('[[task]]\nname = "a"\ncommand = ["x"]\ncpu = { min = -1 }', "task a.cpu.min"),
    ('[[task]]\nname = "a"\ncommand = ["x"]\ncpu = { min = "abc" }', "task a.cpu.min"),
    ('[[task]]\nname = "a"\ncommand = ["x"]\ncpu = { min = 500, max = 100 }', "task a.cpu.max"),
    ('[[task]]\nname = "a"\ncommand = ["x"]\npriority = "urgent"', "task a.priority"),
    ('[[task]]\nname = "a"\ncgroup = "../../etc"', "task a.cgroup"),
    ('[[task]]\nname = "a"\npids = [999999999]', "task a.pids"),
    ('[[task]]\nname = "a/b"\ncommand = ["x"]', "task[0].name"),
    ('[[task]]\nname = "a"', "task a"),
    ('[[task]]\nname = "a"\ncommand = "x y"', "task a.command"),
    ('[[task]]\nname = "a"\ncommand = ["x"]\nforecaster = "prophet"', "task a.forecaster"),
    ('[[task]]\nname = "a"\ncommand = ["x"]\n[[task]]\nname = "a"\ncommand = ["y"]', "task[1].name"),
    ("this is = = not toml", "<string>"),
])
def test_bad_config_names_the_field(text, field):
    with pytest.raises(ConfigError) as err:
        config.parse(text)
    assert err.value.field == field, str(err.value)
    assert err.value.exit_status == 2


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(str(tmp_path / "nope.toml"))
