"""A stock Python grpcio client against plugind's Unix socket (run by tests/tests/python.rs).

Usage: smoke.py SOCKET STUBS_DIR. Prints one JSON object: what a stock channel got, and what a
channel with `grpc.default_authority` got from Publish and Control.Status.
"""

import json
import sys

import grpc

sys.path.insert(0, sys.argv[2])
from plugind.v1 import plugind_pb2 as pb  # noqa: E402
from plugind.v1 import plugind_pb2_grpc as rpc  # noqa: E402

target = "unix:" + sys.argv[1]
result = {}

# As it comes: gRPC C-core sends the socket path, percent-encoded, as `:authority`.
with grpc.insecure_channel(target) as channel:
    try:
        rpc.ControlStub(channel).Status(pb.StatusRequest(), timeout=10)
        result["stock"] = "OK"
    except grpc.RpcError as e:
        result["stock"] = e.code().name
        result["stock_details"] = e.details()

# With the option the README and the proto document.
options = [("grpc.default_authority", "localhost")]
with grpc.insecure_channel(target, options=options) as channel:
    published = rpc.PublisherStub(channel).Publish(
        pb.PublishRequest(
            topic="echo.python",
            payload=b"from python",
            headers=[pb.Header(name="via", value="grpcio")],
        ),
        timeout=10,
    )
    result["id"] = published.id
    result["reached"] = published.instances
    status = rpc.ControlStub(channel).Status(pb.StatusRequest(), timeout=10)
    result["version"] = status.version
    result["instances"] = [i.name for i in status.instances]

print(json.dumps(result))
