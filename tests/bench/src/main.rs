//! `high-templar-bench`: load generator (work in progress).

fn main() {
    eprintln!("high-templar-bench: not implemented yet");
    std::process::exit(1);
}
