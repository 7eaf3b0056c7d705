//! Zero-copy delivery: a plugin reads the host's payload buffer in place, and handing one
//! message to two instances allocates nothing on the host side.
//!
//! This binary installs a counting global allocator; it counts per thread, so other tests
//! running in parallel do not disturb the count. A plugin library has its own allocator
//! statics, so allocations inside plugin code are not counted here: the no-op fixture makes
//! none, and the payload-address check shows the plugin did not copy either.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::Arc,
};

use plugind::loader::{self, Policy};
use plugind_api::{Outcome, hosting, testing::TestMessage};
use plugind_tests::{
    fixtures::{self, Profile},
    recording::Recorder,
};

thread_local! {
    // `const` and `Copy`: no lazy initialisation and no destructor, so the allocator may
    // touch it without allocating itself.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: forwards every call to `System` unchanged; it only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds `GlobalAlloc::dealloc`'s contract, passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract, passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn plugins_read_the_hosts_payload_buffer_in_place() {
    let lib = loader::load(
        &fixtures::library("fx-echo", Profile::Dev),
        &Policy::default(),
    )
    .unwrap();
    let message = Arc::new(TestMessage::new("echo.x", vec![0x5a; 256]));
    let host_address = message.payload.as_ptr() as usize;
    for name in ["left", "right"] {
        let recorder = Recorder::new(name, "0.1.0", 1);
        let config = format!(r#"{{"label":"{name}"}}"#);
        let mut instance = lib.instantiate(&config, recorder.handle()).unwrap();
        let outcome = instance.handle(hosting::message_handle(message.clone()));
        assert_eq!(outcome, Ok(Outcome::Ack));
        let handled = recorder
            .logs()
            .into_iter()
            .find(|l| l.message == "handled")
            .expect("fx-echo logs every delivery");
        assert_eq!(
            handled.field("payload_ptr"),
            Some(host_address.to_string().as_str())
        );
        assert_eq!(handled.field("payload_len"), Some("256"));
    }
    assert_eq!(
        Arc::strong_count(&message),
        1,
        "every handle given out was dropped"
    );
}

#[test]
fn handing_one_message_to_two_instances_allocates_nothing() {
    let lib = loader::load(
        &fixtures::library("fx-noop", Profile::Dev),
        &Policy::default(),
    )
    .unwrap();
    let recorder = Recorder::new("noop", "0.1.0", 1);
    let mut first = lib.instantiate("{}", recorder.handle()).unwrap();
    let mut second = lib.instantiate("{}", recorder.handle()).unwrap();
    let message = Arc::new(TestMessage::new("noop", vec![1; 256]));
    // Warm up: first calls may resolve lazily bound symbols.
    first
        .handle(hosting::message_handle(message.clone()))
        .unwrap();
    second
        .handle(hosting::message_handle(message.clone()))
        .unwrap();

    let before = allocations();
    for _ in 0..1000 {
        assert_eq!(
            first.handle(hosting::message_handle(message.clone())),
            Ok(Outcome::Ack)
        );
        assert_eq!(
            second.handle(hosting::message_handle(message.clone())),
            Ok(Outcome::Ack)
        );
    }
    let after = allocations();
    assert_eq!(
        after - before,
        0,
        "2,000 hand-offs allocated on the host side"
    );
    assert_eq!(
        Arc::strong_count(&message),
        1,
        "every handle given out was dropped"
    );

    // The counter is live: a message of our own does allocate.
    let before = allocations();
    drop(std::hint::black_box(Arc::new(TestMessage::new(
        "noop",
        vec![1; 256],
    ))));
    assert!(allocations() > before);
}
