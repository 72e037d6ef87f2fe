//! What the commands print on standard output. A reader that goes away early (`envgate check |
//! head`) ends the output quietly, as with any Unix tool, instead of a panic message; any other
//! write error is said on stderr and ends envgate with exit code 1.

use std::io::{ErrorKind, Write};

/// Writes `text` to standard output and flushes it.
pub fn emit(text: impl AsRef<[u8]>) {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_ref()).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::BrokenPipe => {}
        Err(e) => {
            eprintln!("envgate: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}
