"""A Weaviate collection made before chunks kept their place in the original text gets the
property in place on the next start (the real client against the local fake Weaviate), and
a restart that finds it already there is no error."""

from __future__ import annotations

import weaviate.classes as wvc

from servers.retrieval.models import DocumentInput, SearchMode, SearchQuery
from servers.retrieval.stores.weaviate import WeaviateConfig, WeaviateStore
from tests.fakes.weaviate_server import FakeWeaviate
from tests.unit.retrieval_support import hash_engine


class _BeforeLocations(WeaviateStore):
    """The store as it was: no chunk properties added since the first version."""

    @staticmethod
    def _added_properties() -> list[wvc.config.Property]:
        return []


async def test_an_old_collection_gains_locations_in_place() -> None:
    text = "Zebra rules  apply.\r\nAlways to every zebra."
    with FakeWeaviate() as server:
        config = WeaviateConfig(url=server.url, grpc_port=server.grpc_port, api_key=None, timeout_s=20,
                                collection_prefix="Upgrade")
        old = _BeforeLocations(config)
        await old.provision("tenant-a")
        await old.close()
        for _ in range(2):  # the upgrade, then a start that finds it done
            store = WeaviateStore(config)
            engine = hash_engine(store)
            await store.provision("tenant-a")
            await engine.ingest("tenant-a", [DocumentInput(document_id="d", title="Zebras", text=text)])
            hits = (await engine.search("tenant-a", SearchQuery("zebra", mode=SearchMode.BM25))).hits
            await store.close()
            assert hits and hits[0].location is not None
            location = hits[0].location
            assert location.original_text(hits[0].text) == text[location.start:location.end]
