"""Compose parses and everything it mounts or builds exists."""

from __future__ import annotations

from pathlib import Path

from tests.deploy.conftest import (
    COMPOSE,
    DASHBOARD,
    DOCKERFILE,
    PROM_CONFIG,
    PROM_DIR,
    REPO,
    bind_mounts,
    compose,
    compose_env,
    dockerfile_stages,
    load_yaml,
    seconds,
)


def test_compose_parses_and_references_exist() -> None:
    doc = compose()
    services = doc["services"]
    assert {"lookback", "lookback-cpu", "prometheus", "grafana"} <= set(services)
    stages = dockerfile_stages()
    for name in ("lookback", "lookback-cpu"):
        build = services[name]["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
        assert build["target"] in stages
        assert services[name]["ports"] == ["8000:8000"]
        grace = seconds(services[name]["stop_grace_period"])
        drain = float(compose_env(services[name])["LOOKBACK_DRAIN_GRACE_S"])
        assert grace > 2 * drain, f"{name}: stop_grace_period {grace}s <= 2 x drain {drain}s"
    assert services["lookback"]["build"]["target"] == "gpu"
    (dev,) = services["lookback"]["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    cpu = services["lookback-cpu"]
    assert cpu["build"]["target"] == "cpu" and cpu["profiles"] == ["cpu"]
    assert "lookback" in cpu["networks"]["default"]["aliases"]
    assert "deploy" not in cpu

    for name, svc in services.items():
        for dst, src in bind_mounts(svc).items():
            assert src.exists(), f"{name}: mount source for {dst} missing: {src}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            assert src.startswith(".") or src in (doc.get("volumes") or {}), (
                f"{name}: named volume {src} not declared"
            )

    prom = bind_mounts(services["prometheus"])
    config_in = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file=")).split(
        "=", 1
    )[1]
    assert prom[config_in] == PROM_CONFIG
    for rule_file in load_yaml(PROM_CONFIG)["rule_files"]:
        inside = str(Path(config_in).parent / rule_file)
        assert prom.get(inside) == PROM_DIR / rule_file, f"{inside} not mounted"
    # Prometheus scrapes a host the compose network resolves.
    targets = [
        t
        for j in load_yaml(PROM_CONFIG)["scrape_configs"]
        for sc in j["static_configs"]
        for t in sc["targets"]
    ]
    names = set(services) | {"localhost"} | set(cpu["networks"]["default"]["aliases"])
    assert all(t.split(":")[0] in names for t in targets), targets
    home = compose_env(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    dash_dir = next(d for d, s in bind_mounts(services["grafana"]).items() if s == DASHBOARD.parent)
    assert home == f"{dash_dir}/{DASHBOARD.name}"
