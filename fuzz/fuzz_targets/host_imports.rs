//! Arbitrary sequences of host-import calls (arbitrary shapes, sizes, densities, structures,
//! names; live, dropped and forged handles) against the built-in tiny model, through
//! `espalier::plugin::replay`. Fails on any panic, abort, or host bytes beyond the budget.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    espalier::plugin::replay::replay(data);
});
