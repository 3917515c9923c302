return {redis.call('GETEX', KEYS[1], 'PX', ARGV[1]), redis.call('GET', KEYS[2])}
