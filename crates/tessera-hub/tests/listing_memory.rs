//! Listing models and finding what was built from one hold a batch of rows at a time
//! beside the page, whatever the hub holds: memory counted by the allocator, alone in its test
//! binary so nothing else allocates meanwhile.

use peakmem_alloc::{INSTRUMENTED_SYSTEM, PeakMemAlloc, PeakMemAllocTrait};
use serde_json::json;
use tessera_hub::Filters;

#[global_allocator]
static GLOBAL: &PeakMemAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

#[test]
fn a_page_of_models_costs_a_page_not_the_hub() {
    const MODELS: usize = 128;
    const META: usize = 256 << 10;
    // 32 MiB of metadata in all; a page, or the search for derived models, holds a batch
    // of rows (8; PostgreSQL's client keeps them twice) and a few records at once.
    const BOUND: usize = 8 << 20;
    let dir = tempfile::tempdir().unwrap();
    let store = tessera_hub::testing::open_store(dir.path().join("hub"));
    for i in 0..MODELS {
        let metadata = json!({"blob": "m".repeat(META), "library": "numpy"});
        store.create_model(&format!("mem.m{i:03}"), "1.0.0", &metadata, None, None).unwrap();
    }
    let page = Filters { limit: Some(1), ..Default::default() };
    GLOBAL.reset_peak_memory();
    let before = GLOBAL.get_peak_memory();
    let got = store.search_models(None, &page).unwrap();
    let listed = GLOBAL.get_peak_memory() - before;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].name, "mem.m000");
    // The second page is the next name.
    let next = store.search_models(None, &Filters { offset: Some(1), limit: Some(1), ..Default::default() }).unwrap();
    assert_eq!(next[0].name, "mem.m001");
    GLOBAL.reset_peak_memory();
    let before = GLOBAL.get_peak_memory();
    assert!(store.derived_models("mem.m000", "1.0.0").unwrap().is_empty());
    let derived = GLOBAL.get_peak_memory() - before;
    eprintln!("a page of one: {} KiB; derived models: {} KiB", listed >> 10, derived >> 10);
    assert!(listed < BOUND, "a page of one model took {listed} bytes");
    assert!(derived < BOUND, "finding derived models took {derived} bytes");
    // Every model is still listed when asked for all.
    assert_eq!(store.models(None).unwrap().len(), MODELS);
}
