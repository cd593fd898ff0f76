//! The guest agent with its test-only misbehaviour compiled in (cargo feature
//! `misbehave`, see the library's `misbehave` module): the same program as
//! `neurovisor-agent`, built as a binary of its own so the real agent is never
//! this one. Only the host's hostile-guest tests put it into an image.

fn main() {
    neurovisor_guest_agent::main();
}
