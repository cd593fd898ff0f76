//! `neurovisor-agent`: the guest agent, installed as `/sbin/neurovisor-agent`
//! and run by the guest kernel as init. See the library for what it does.

fn main() {
    neurovisor_guest_agent::main();
}
