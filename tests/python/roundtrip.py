"""A Python client generated from proto/ with grpcio-tools: enqueue, lease, complete, state.

Usage: roundtrip.py BROKER_ADDRESS PROTO_DIR
Exits non-zero with a message when any step does not behave as documented.
"""

import sys
import tempfile

from grpc_tools import protoc
import grpc


def main() -> None:
    address, proto_dir = sys.argv[1], sys.argv[2]
    out = tempfile.mkdtemp(prefix="wq-py-")
    rc = protoc.main([
        "protoc", f"-I{proto_dir}", f"-I{protoc._get_resource_file_name('grpc_tools', '_proto')}",
        f"--python_out={out}", f"--grpc_python_out={out}", "wq/v1/work_queue.proto",
    ])
    assert rc == 0, f"protoc failed with {rc}"
    sys.path.insert(0, out)
    from wq.v1 import work_queue_pb2 as pb, work_queue_pb2_grpc as rpc

    stub = rpc.WorkQueueServiceStub(grpc.insecure_channel(address))
    enq = stub.Enqueue(pb.EnqueueRequest(queue="py", items=[pb.EnqueueItem(payload=b"hello", id="py-1")]))
    assert enq.results[0].id == "py-1" and not enq.results[0].duplicate, enq
    lease = stub.Lease(pb.LeaseRequest(queue="py", max_items=1))
    assert len(lease.items) == 1 and lease.items[0].payload == b"hello", lease
    assert lease.items[0].attempt == 1
    done = stub.Complete(pb.CompleteRequest(queue="py", completions=[pb.Completion(lease_id=lease.items[0].lease_id)]))
    assert done.results[0].outcome == pb.LEASE_OUTCOME_OK, done
    state = stub.QueueState(pb.QueueStateRequest(queue="py"))
    assert state.drained and state.completed_total == 1, state
    try:
        stub.Lease(pb.LeaseRequest(queue="bad name"))
        raise AssertionError("a bad queue name must be rejected")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert err.details().startswith("queue"), err.details()
    print("python round trip ok")


if __name__ == "__main__":
    main()
