"""Configs: every value type-checked when read, every number finite and in range, one line per problem."""

import pytest

from hetlora.config import RunConfig, from_mapping, load_toml
from hetlora.flower.common import config_from_run_config


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"lr": float("nan")}, "lr must be a finite number, got nan"),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"lam": float("nan")}, "lam must be a finite number"),
        ({"dp_clip": float("nan")}, "dp_clip must be a finite number"),
        ({"norm_bound": float("nan")}, "norm_bound must be a finite number"),
        ({"norm_bound": float("inf")}, "norm_bound must be a finite number"),
        ({"max_clients": 0}, "max_clients must be ≥ 1"),
        ({"max_clients": -1}, "max_clients must be ≥ 1"),
        ({"batch_size": 100000}, "batch_size 100000"),
        ({"dp_noise": 1.0}, "dp_noise needs dp_clip"),
        ({"dp_clip": 1.0, "max_clients": 3, "clients_per_round": 4}, "exceeds the 3 registered clients"),
        ({"max_clients": 3, "client_pool": 3}, "set one"),
        ({"out": ""}, "out must name a directory"),
        ({"out": "  "}, "out must name a directory"),
        ({"round_timeout": 0.0}, "round_timeout must be a positive number"),
        ({"over_select": -0.5}, r"over_select must lie in \[0, 10\]"),
        ({"client_delay": "gamma:2"}, "client_delay 'gamma:2': expected fixed:S"),
        ({"client_delay": "lognormal:1"}, "lognormal takes 2 finite non-negative"),
        ({"client_delay": "exp:1,silent=1.5"}, r"silent must be a probability in \[0, 1\)"),
        ({"client_delay": "exp:1,slow=0.5"}, "unknown option 'slow'"),
        ({"client_delay": "missing-table.json"}, "client_delay missing-table.json: "),
        ({"over_select": 0.5, "dp_clip": 1.0}, "over_select with DP is refused"),
        ({"client_delay": "exp:1", "secure_aggregation": True, "norm_bound": None},
         "client_delay with secure aggregation is refused"),
        ({"over_select": 0.5, "sampling": "cyclic"}, "refused with sampling = cyclic"),
        # an option the method would not honour is refused, not accepted and ignored
        ({"method": "fedavg", "prune": True}, "fedavg's clients do not self-prune \\(every client trains one rank"),
        ({"method": "fslora", "prune": True}, r"fslora's clients do not self-prune \(fslora clients never prune\)"),
        ({"method": "fft", "prune": True}, "fft clients never prune"),
        ({"method": "fedavg", "per_layer": True}, "per_layer weights are hetlora's"),
        ({"per_layer": True, "dp_clip": 1.0}, "per_layer weights are refused under DP"),
        ({"method": "hetlora", "florist_energy": 0.8}, "florist_energy is florist's energy threshold; hetlora has none"),
        ({"method": "hetlora", "rank": 5}, "rank sets the one rank of a uniform-rank method"),
        ({"method": "fft", "memory_budget_mb": 2000.0}, r"fft's clients \(fft\) were not calibrated"),
        ({"method": "flexlora", "dp_clip": 1.0}, "flexlora's is not, and would be silently replaced"),
    ],
)
def test_bad_values_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**changes).validate()


@pytest.mark.parametrize(
    "toml,message",
    [
        ('lr = "1e-3"', r"lr = '1e-3' must be float \(got str\)"),
        ('ranks = "2,3"', r"ranks = '2,3' must be a list of int"),
        ('rounds = "two"', r"rounds = 'two' must be int"),
        ("r_max = 4.5", r"r_max = 4.5 must be int \(got float\)"),
        ("rounds = true", r"rounds = True must be int \(got bool\)"),
        ('target_modules = "q_proj"', r"target_modules = 'q_proj' must be a list of str"),
        ("max_clients = 2.0", r"max_clients = 2.0 must be int or off"),
        ("nonsense = 1", "unknown config key 'nonsense'"),
        ("rounds = 99999999999999999999", "rounds = 99999999999999999999 is beyond a 64-bit integer"),
        ("seed = -9223372036854775809", "seed = -9223372036854775809 is beyond a 64-bit integer"),
        ("r-min = 2\nr_min = 3", "'r-min' and 'r_min' both set r_min: give it once"),
    ],
)
def test_toml_types_are_checked_when_read(tmp_path, toml, message):
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ValueError, match=message) as err:
        load_toml(path)
    assert "\n" not in str(err.value)


def test_good_toml_and_aliases(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[hetlora]\nlambda = 0.1\nr-min = 3\nlr = 1\nnorm_bound = "off"\ntarget-modules = ["q_proj"]\n')
    cfg = load_toml(path)
    assert cfg.lam == 0.1 and cfg.r_min == 3 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.norm_bound is None and cfg.target_modules == ["q_proj"]
    cfg.validate()


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load_toml(tmp_path)


def test_off_only_where_a_setting_allows_it():
    """Flower run configs: 'off' is None for norm-bound, but tier-eval = "off" is a value of its own."""
    cfg = config_from_run_config({"tier-eval": "off", "norm-bound": "off", "rounds": 2})
    assert cfg.tier_eval == "off" and cfg.norm_bound is None and cfg.rounds == 2
    cfg.validate()
    with pytest.raises(ValueError, match="rounds = 'off' must be int"):
        config_from_run_config({"rounds": "off"})


def test_from_mapping_reports_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        from_mapping({"rounds": "x", "lr": "y"})
    assert "rounds" in str(err.value) and "lr" in str(err.value)


def test_a_toml_with_both_a_hetlora_table_and_top_level_keys_is_refused(tmp_path):
    """The top-level keys were silently ignored (the run used the defaults)."""
    path = tmp_path / "c.toml"
    path.write_text('rounds = 9\nlr = 0.1\n\n[hetlora]\nmethod = "fedavg"\n')
    with pytest.raises(ValueError, match=r"both a \[hetlora\] table and top-level keys \['lr', 'rounds'\]"):
        load_toml(path)


def test_cuda_on_a_machine_without_it_is_one_line(monkeypatch):
    import hetlora.config as config

    monkeypatch.setattr(config, "_cuda_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device") as err:
        RunConfig(device="cuda").validate()
    assert "\n" not in str(err.value)


def test_ordered_dropout_is_refused_for_a_method_without_rank_components(tmp_path):
    with pytest.raises(ValueError, match="ordered_dropout trains a prefix of LoRA rank components; fft's clients train none"):
        RunConfig(method="fft", ordered_dropout=True, out=str(tmp_path)).validate()
    RunConfig(method="hetlora", ordered_dropout=True, out=str(tmp_path)).validate()


def test_a_delay_table_is_checked_before_anything_loads(tmp_path):
    """Each client's delay must be seconds ≥ 0 or null (never replies); one bad entry is named."""
    table = tmp_path / "delays.json"
    table.write_text('{"alice": 1.5, "bob": null, "carol": -2}')
    with pytest.raises(ValueError, match=r"client 'carol' has -2; expected seconds ≥ 0 or null"):
        RunConfig(client_delay=str(table)).validate()
    table.write_text('[1, 2]')
    with pytest.raises(ValueError, match="expected a JSON object"):
        RunConfig(client_delay=str(table)).validate()


def test_the_flower_apps_own_settings_make_a_valid_config():
    """``flwr run .`` reads pyproject's [tool.flwr.app.config]: every key must be one hetlora knows, in range."""
    import tomllib
    from pathlib import Path

    settings = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = config_from_run_config(settings).validate()
    assert (cfg.round_timeout, cfg.over_select, cfg.method) == (600.0, 0.0, "hetlora")


def test_the_options_each_method_honours_are_accepted():
    """The other side of the refusals above: what each method does take still validates."""
    for changes in ({"method": "hetlora", "prune": True, "per_layer": True}, {"method": "ffa", "prune": True},
                    {"method": "fedavg", "rank": 5}, {"method": "florist", "florist_energy": 0.8},
                    {"method": "hetlora-naive", "memory_budget_mb": 2000.0}, {"method": "ffa", "memory_budget_mb": 2000.0},
                    {"method": "fedex-lora", "memory_budget_mb": 2000.0}, {"method": "fed-plora", "memory_budget_mb": 2000.0},
                    {"method": "florist", "memory_budget_mb": 2000.0},
                    {"method": "hetlora-svd-revive", "dp_clip": 1.0}):
        RunConfig(**changes).validate()
