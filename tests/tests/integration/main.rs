//! Integration tests of the wq broker: real redis-server, real gRPC, one binary with a module
//! per feature to keep link times down.

mod admin;
mod bad_input;
mod cli;
mod cli_edges;
mod client;
mod cluster;
mod deploy;
mod edges;
mod enqueue;
mod faults;
mod fuzz;
mod hostile;
mod lease;
mod lifecycle;
mod limits;
mod model;
mod outage;
mod replicas;
mod security;
mod sentinel;
mod setup;
mod tools;
mod waiting;
mod worker;
mod worker_library;
mod worker_process;
