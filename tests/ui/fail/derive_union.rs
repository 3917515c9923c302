use cache_runtime::CacheKey;

#[derive(CacheKey)]
union Bits { a: u32, b: f32 }

fn main() {}
