//! NeuroVisor host library: boots ephemeral microVMs and runs code inside them.
//!
//! - [`vmm`]: the VMM backend trait and its implementations (QEMU microvm).
//! - [`channel`]: the host <-> guest channel (hybrid vsock + gRPC client).
//! - [`images`]: where the guest kernel and root filesystems live, and how they are built.
//! - [`exec`]: one execution end to end: boot, run, stream, destroy.
//! - [`boot`]: stall budgets derived from measured boot times, retry bookkeeping.
//! - [`config`]: VM size tiers and host paths.
//! - [`pool`]: the pre-warmed VM pool (one VM per execution, bounded by `max`).
//! - [`server`]: the daemon: gRPC API (`neurovisor.v1.Sandbox`, inference, health,
//!   reflection), `/metrics`, lifecycle.
//! - [`llm`]: LLM clients (Ollama `/api/chat` and `/api/generate`, OpenAI-compatible
//!   chat completions) behind the [`llm::LlmClient`] trait.
//! - [`agent`]: agent mode: an LLM solves a task by running code in fresh VMs.
//! - [`metrics`]: Prometheus metrics.
//! - [`security`]: capabilities, seccomp, per-VM cgroups, jails, rate limits, eBPF LSM.
//! - [`transport`]: how clients reach the daemon and who may: the Unix socket in
//!   the state directory, the TCP token, state directory ownership checks.
//! - [`doctor`]: checks that the host can run VMs and says how to fix what is missing.

pub mod agent;
pub mod boot;
pub mod channel;
pub mod config;
pub mod daemon_client;
pub mod desktop;
pub mod doctor;
pub mod e2b;
pub mod exec;
pub mod images;
pub mod llm;
pub mod mcp;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod profile;
pub mod security;
pub mod server;
pub mod snapshot;
pub mod supervisor;
pub mod telemetry;
pub mod transport;
pub mod vmm;

pub use config::VmSize;
pub use exec::{ExecError, ExecOutcome, ExecRequest, Output, OutputSink, ReadyVm, Sandbox};
