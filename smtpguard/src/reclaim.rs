//! Frees large values off the path that replaced them. A policy of millions of prefixes is
//! millions of small allocations: freeing the one a reload replaced took seconds, between the
//! flip and the state record, on the daemon's only thread.

/// Drops `value` on a short-lived thread of its own.
pub fn drop_later<T: Send + 'static>(value: T) {
    // If no thread can be started, the closure is dropped here, and the value with it.
    let _ = std::thread::Builder::new()
        .name("reclaim".to_owned())
        .spawn(move || drop(value));
}
