//! palisade's tc programs. Placeholder: replaced by the datapath implementation.
#![no_std]
#![no_main]

use aya_ebpf::{macros::classifier, programs::TcContext};

#[classifier]
pub fn palisade_from_pod(_ctx: TcContext) -> i32 {
    -1
}

#[classifier]
pub fn palisade_to_pod(_ctx: TcContext) -> i32 {
    -1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
