"""A Google Cloud Storage emulator for the tests: `gcp-storage-emulator` served from a thread of the test process on
127.0.0.1, in memory, with the environment that points gcsfs (etils epath), google-cloud-storage (Orbax's deletes,
TensorBoard) and tensorstore (Orbax's arrays) at it. Subprocesses inherit it through `os.environ`."""

from __future__ import annotations

import logging
import os
import socket

# Read when fsspec and gcsfs are imported: set before anything imports them (conftest imports this module first).
STATIC_ENV = {
  "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else every call first probes the bucket type over gRPC (timeouts)
  "FSSPEC_GCS_TOKEN": "anon",  # no credential lookup
  "FSSPEC_GCS_USE_LISTINGS_CACHE": "false",  # listings change under gcsfs's feet (tensorstore writes too)
  "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",  # tensorstore: no credential lookup
  "NO_GCE_CHECK": "true",
}
BUCKET = "maxlm-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _add_move_to(server_module, objects) -> None:
  """gcsfs renames with the `moveTo` call the emulator lacks (it answers 501 and gcsfs retries for half a minute
  before copying): serve it as copy + delete."""

  def move(request, response, storage, *args, **kwargs):
    request.params["dest_bucket_name"] = request.params["bucket_name"]
    objects.copy(request, response, storage)
    if response.status == 200:
      objects._delete(storage, request.params["bucket_name"], request.params["object_id"])

  route = (
    r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
    {"POST": move},
  )
  server_module.HANDLERS = (route, *server_module.HANDLERS)


def _add_generation_headers(server_module, objects) -> None:
  """Downloads answer with the object's generation in `x-goog-generation`, as GCS does: tensorstore (Orbax's
  OCDBT manifests) reads it on every read and refuses a response without it ("Malformed StorageGeneration")."""
  original = objects.download

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    if response.status in (200, 206):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

  objects.download = download  # objects.get serves ?alt=media through this name
  server_module.HANDLERS = tuple(
    (route, {method: download if fn is original else fn for method, fn in methods.items()})
    for route, methods in server_module.HANDLERS
  )


class Emulator:
  def __init__(self):
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    _add_move_to(server, objects)
    _add_generation_headers(server, objects)
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._server = server.create_server("127.0.0.1", self.port, in_memory=True, default_bucket=BUCKET)
    self._server.start()
    self._server._api._httpd.handle_error = lambda *a: None  # clients that hang up early are no error here
    self.env = {
      "STORAGE_EMULATOR_HOST": self.url,  # gcsfs, google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": self.url,  # tensorstore
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,  # array_record's C++ client
    }
    os.environ.update(self.env)

  def objects(self, prefix: str = "") -> list[str]:
    """Names of the bucket's objects under `prefix`."""
    from google.cloud import storage

    client = storage.Client(project="test", client_options={"api_endpoint": self.url})
    return sorted(b.name for b in client.list_blobs(BUCKET, prefix=prefix))

  def stop(self) -> None:
    self._server.stop()
    for key in self.env:
      os.environ.pop(key, None)
