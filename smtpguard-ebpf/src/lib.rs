//! Exists so the daemon crate can name this one as a build dependency (aya-template layout);
//! the program itself is the `smtpguard` binary target.
#![no_std]
