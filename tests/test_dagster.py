"""A real Dagster materialisation of the data assets on MovieLens-100K, checks included."""
from dagster import AssetKey, materialize

from dagster_project.data_assets import lake_tables
from dagster_project.definitions import defs
from dagster_project.resources import SpecResource


def test_definitions_load():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"bronze/interactions_raw", "bronze/quarantine", "silver/interactions", "silver/items",
            "gold/item_index", "gold/user_index", "gold/sequences"} <= keys


def test_materialize_data_assets(tmp_path):
    resource = SpecResource(spec_path="jobs/specs/movielens-100k-smoke.yaml", overrides=[f"lake.root={tmp_path}"])
    result = materialize([lake_tables], resources={"spec": resource})
    assert result.success
    mats = {m.asset_key: m.metadata for m in result.asset_materializations_for_node("lake_tables")}
    assert mats[AssetKey(["gold", "user_index"])]["rows"].value == 943
    assert mats[AssetKey(["gold", "item_index"])]["rows"].value == 1349
    assert mats[AssetKey(["gold", "sequences"])]["delta_version"].value == 0
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"no_null_ids": True, "kcore_holds": True, "no_train_test_leakage": True,
                      "sequence_items_indexed": True, "quarantine_share": True}
