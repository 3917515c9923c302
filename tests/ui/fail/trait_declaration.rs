use cache_runtime::cached;

trait Repo {
    #[cached]
    fn get(&self, id: u64) -> u64;
}

fn main() {}
