"""Stage pack resolves neighbour keys with one key index per run: outputs byte-identical to the
per-part resolver it replaced, and the index is built once however many neighbour parts run."""

from __future__ import annotations

import hashlib

import pytest

from pipelines.core.driver import InProcess, drive
from pipelines.core.runconfig import RunConfig
from pipelines.training import pack as pack_mod
from pipelines.training.pack import PackConfig, PackStage
from storage.fs import DataRoot
from storage.manifest import list_manifests, read_manifest
from tests.pipelines.training.corpus_factory import (
    make_neighbour_shard,
    make_token_shard,
    pack_corpus,
)

# sha256 of every pack/ file, written by the per-part resolver (main at 5c26e2f) on
# `tricky_corpus`: a key in two token shards (the lower id wins), neighbour keys with no tokens,
# a neighbour row whose own document has no tokens, keys of different widths.
GOLDEN: dict[str, str] = {
    "n-00000.doc.npy": "83e81b209e69fafe369e0904272268620f750919885134145101ab2fd12dad04",
    "n-00000.nbr.npy": "7e36cdd93177083511f2ebe2e2a7212920a9f8bd3dac86572cd84293ed771d8c",
    "n-00000.offsets.npy": "eeac80d6176a6fdcc38b5633eb04016e32e6f558f35ef206abbc3ba4c44e1435",
    "n-00000.query.npy": "f8b2fd36902c0acf203ec62ca3fb5ff302478a801d7e2fa4311f7aef51392b67",
    "n-00000.variant.npy": "8e0cfa11ebe8cbd6e92c3f3b4c688f44f64cfb5a19c47f723b394f5ade7c9381",
    "n-00001.doc.npy": "c39d37921374591d6ead6cf885326bb385ab9ae0cbbf9889e3076fb98befc100",
    "n-00001.nbr.npy": "90a842fd1ff8c98398d3b878b2c410fcc50c89cd8b18be06b4c87635242df16e",
    "n-00001.offsets.npy": "eeac80d6176a6fdcc38b5633eb04016e32e6f558f35ef206abbc3ba4c44e1435",
    "n-00001.query.npy": "f8b2fd36902c0acf203ec62ca3fb5ff302478a801d7e2fa4311f7aef51392b67",
    "n-00001.variant.npy": "8e0cfa11ebe8cbd6e92c3f3b4c688f44f64cfb5a19c47f723b394f5ade7c9381",
    "n-00002.doc.npy": "bf2e605f7b4ce7cfbf29eb939a9532e38b9b131a460f986385e1633093d933e4",
    "n-00002.nbr.npy": "d983482704ecab7c19043db1b94eaf0533a0301673bdd531811ff042091a1b74",
    "n-00002.offsets.npy": "281a308470866d39d2b4815c9fc749b244ecacc51480e908d1dbd27630c76204",
    "n-00002.query.npy": "b735b67bacd15157e104a14ff9516666940a789b9e92e2eed9087f5f2edd69e4",
    "n-00002.variant.npy": "9d90c43d9a101aacb6867f45ee4415c98326975eb934ea7c24007da382f325f6",
    "n-00003.doc.npy": "9d935f584b04e8677f8b1d5cb42452278a1360ffdacda5ac9b19b8e90ea4e31f",
    "n-00003.nbr.npy": "7fbd847ef03e5405ed02fee5e2c6acc8e71930b92546ac870b1efcd75a3ed6c6",
    "n-00003.offsets.npy": "eeac80d6176a6fdcc38b5633eb04016e32e6f558f35ef206abbc3ba4c44e1435",
    "n-00003.query.npy": "f8b2fd36902c0acf203ec62ca3fb5ff302478a801d7e2fa4311f7aef51392b67",
    "n-00003.variant.npy": "8e0cfa11ebe8cbd6e92c3f3b4c688f44f64cfb5a19c47f723b394f5ade7c9381",
    "t-00000.holdout.npy": "990f9e2bc91f0bf536abf2ae573129dece07816abebc698566064f68719b32e8",
    "t-00000.keys.npy": "82ccc56b05812f4b98650193e1d82631c00b443fd2e5a8f9f001846573e86e54",
    "t-00000.offsets.npy": "c53e832350ab1c54f5ef8ab664f7bae36edbda6ffd1cbfc2d8fb3abf130e9f04",
    "t-00000.tokens.npy": "c919a122cf5aab332331cb26eaa45afe668a6fd13a9f8d885f7ad6548ba84ff7",
    "t-00001.holdout.npy": "3c5050f93f0062d7dd0a861603f05f854915080f51a784471902212b3f90b129",
    "t-00001.keys.npy": "82f7cba7bcdb75a2546ea7715899f90dde25aab69028a3b0b0649085807ccefa",
    "t-00001.offsets.npy": "c53e832350ab1c54f5ef8ab664f7bae36edbda6ffd1cbfc2d8fb3abf130e9f04",
    "t-00001.tokens.npy": "9c393e4058d7661823634a0e8f712068ead3c5e67c00692d93e3428c80a1db0b",
    "t-00002.holdout.npy": "d5440af1a92b1ae29dc1836b591461ba5f56e4ca69169fdca279d42af0daf1ea",
    "t-00002.keys.npy": "a5f30530576996e69d36c5f1f5197aa2e16be7403a9102b317d4c1d62968d44a",
    "t-00002.offsets.npy": "bc7dbfc00be65304b682b8e5966555cf2acb1169a10efa760175486f8a948ee9",
    "t-00002.tokens.npy": "a78bd78680821919b835d5ab74ba980ddfd3700d7abb2dfb8857eb25353615c0",
    "t-00003.holdout.npy": "87cfb9952de7e389dca6daecfbe2cdb0f33554b16173e7e660b731bfd21e0944",
    "t-00003.keys.npy": "1bfa5431ce425a97a3de9614f8b9e2c8a39595c590f3a8757157b43589e6aa71",
    "t-00003.offsets.npy": "c53e832350ab1c54f5ef8ab664f7bae36edbda6ffd1cbfc2d8fb3abf130e9f04",
    "t-00003.tokens.npy": "007751df31729fdce374b15829efec6ff78bebee810752c911141f6898a1aad3",
}


def tricky_corpus(root: DataRoot) -> None:
    keys = [f"{i:04d}" for i in range(60)]
    shards = [keys[s::4] for s in range(4)]
    shards[2] = shards[2] + ["0001", "00099"]  # a duplicate of shard 0's key, a wider key
    for s, part in enumerate(shards):
        make_token_shard(root, f"{s:05d}", part, seed=s)
    everything = ["99999", *keys, "0001"]
    for s, part in enumerate(shards):
        make_neighbour_shard(root, f"{s:05d}", part + (["88888"] if s == 1 else []), everything)


def digests(root: DataRoot) -> dict[str, str]:
    out = {}
    for path in sorted(root.glob("pack/*.npy")):
        with root.fs.open(path, "rb") as f:
            out[path.rsplit("/", 1)[1]] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_outputs_are_byte_identical_to_the_per_part_resolver(tmp_path):
    root = DataRoot(str(tmp_path))
    tricky_corpus(root)
    pack_corpus(root)
    assert digests(root) == GOLDEN
    m = read_manifest(root, "pack", "n-00001")
    assert m.metrics["rows_without_tokens"] == 6  # "88888": 2 queries x 3 variants
    assert read_manifest(root, "pack", "n-00003").metrics["neighbours_without_tokens"] == 30
    assert m.metrics["token_parts"] == [["00000", 15], ["00001", 15], ["00002", 17],
                                        ["00003", 15]]


def test_one_key_index_per_run_for_every_neighbour_part(tmp_path, monkeypatch):
    root = DataRoot(str(tmp_path))
    tricky_corpus(root)
    builds = []
    real = pack_mod.KeyIndex.build
    monkeypatch.setattr(pack_mod.KeyIndex, "build",
                        staticmethod(lambda *a, **k: builds.append(1) or real(*a, **k)))
    cfgs = {"pack": PackConfig(), "run": RunConfig(shard_concurrency=2)}
    report = drive(PackStage(), root, cfgs, InProcess())
    assert not report.failed
    assert len([m for m in list_manifests(root, "pack") if m.shard_id.startswith("n-")]) == 4
    assert len(builds) == 1  # not one per neighbour part: pack's work is linear in shards
    assert digests(root) == GOLDEN


@pytest.mark.parametrize("extra", [1, 2])
def test_a_new_token_shard_re_resolves_neighbour_parts_against_it(tmp_path, extra):
    root = DataRoot(str(tmp_path))
    tricky_corpus(root)
    pack_corpus(root)
    for e in range(extra):
        make_token_shard(root, f"0001{e}", ["77777"] if e == 0 else ["0005"])
    ran = pack_corpus(root)
    assert sorted(r for r in ran if r.startswith("n-")) == [f"n-{s:05d}" for s in range(4)]
    m = read_manifest(root, "pack", "n-00000")
    assert m.metrics["token_parts"][-extra:] == [[f"0001{e}", 1] for e in range(extra)]
