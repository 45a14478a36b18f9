//! Standard output that ends the program the Unix way when the reader goes away
//! (`dwctl status | head -1`): the process dies of SIGPIPE, as `cat` or `git` do, instead of
//! panicking. (Rust ignores SIGPIPE so that a closed socket is an error, not a death; only
//! standard output gets this treatment.)

use std::fmt::Arguments;
use std::io::Write;

/// Writes `args` and a newline to standard output.
pub fn line(args: Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| out.write_all(b"\n"));
    if let Err(e) = written.and_then(|()| out.flush()) {
        closed(e);
    }
}

fn closed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        // SAFETY: restoring the default action of a signal and raising it are
        // async-signal-safe calls with no memory effects.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
    }
    eprintln!("dwctl: cannot write to standard output: {e}");
    std::process::exit(1)
}

/// `println!` through [`line`].
macro_rules! outln {
    () => { $crate::stdout::line(format_args!("")) };
    ($($arg:tt)*) => { $crate::stdout::line(format_args!($($arg)*)) };
}

pub(crate) use outln;
